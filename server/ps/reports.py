"""Restores the coordinator has not heard of yet: the report queue of a server's restarts
and rollbacks, carried by its next registration or heartbeat."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from shardps.proto import coordinator_pb2


class RestoreReports:
    """A queue of ShardVersion reports. Thread-safe: one lock guards the list."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: list[coordinator_pb2.ShardVersion] = []

    def add(self, job_id: str, index: int, version: int, lost: int) -> None:
        """A shard now at `version` after a restore that lost (or replays) `lost` versions."""
        with self._lock:
            self._reports.append(coordinator_pb2.ShardVersion(
                job_id=job_id, shard_index=index, version=version, lost_updates=lost))

    def take(self) -> list[coordinator_pb2.ShardVersion]:
        """Every report not yet told (give them back with `put_back` if the RPC that carried
        them failed)."""
        with self._lock:
            reports, self._reports = self._reports, []
        return reports

    def put_back(self, reports: Sequence[coordinator_pb2.ShardVersion]) -> None:
        """Returns reports to the front of the queue, in order."""
        with self._lock:
            self._reports[:0] = list(reports)
