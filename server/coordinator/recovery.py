"""Failure handling in the coordinator's core: sync rollbacks after a server restored a
checkpoint, elastic rejoins, and which servers a resumed job needs.

Pure: no gRPC, no clock. The rules are docs/architecture.md, "Failures".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shardps.proto import common_pb2
from shardps.proto.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class Rollback:
    """The latest rollback of a sync job.

    Attributes:
        id: 0 before the first; +1 for each (servers and workers act on a higher id).
        version: every shard goes back to (and every worker resumes at) this version.
        settled: a worker has reported a step at or past `version` under this id, so every
            shard got back there; a later restore is a new failure, not part of this one.
    """

    id: int = 0
    version: int = 0
    settled: bool = True


def shard_restored(rollback: Rollback, mode: str, running: bool, version: int) -> bool:
    """A server restored a shard of a job at `version`; returns True if that starts a new
    rollback (a sync job that is running).

    While a rollback is unsettled, a restore at or above its version is part of it (that
    shard goes down to the rollback's version when it sees it); one below it lowers the
    rollback to `version` under a new id.
    """
    if mode != "sync" or not running:
        return False
    if rollback.id and not rollback.settled and version >= rollback.version:
        return False
    rollback.id += 1
    rollback.version = version
    rollback.settled = False
    return True


def progress_reported(rollback: Rollback, rollback_id: int, steps: Iterable[int]) -> bool:
    """A worker that has taken rollback `rollback_id` reported `steps`; returns True if this
    settles the current rollback."""
    if rollback.settled or rollback_id != rollback.id:
        return False
    if any(step >= rollback.version for step in steps):
        rollback.settled = True
        return True
    return False


def joiners(spec: JobSpec, workers: Sequence[str], idle: Sequence[str]) -> list[str]:
    """The idle workers a running job takes to get back to `cluster.workers` (elastic)."""
    missing = spec["cluster"]["workers"] - len(workers)
    return list(idle[:max(0, missing)])


def resume_servers(n: int, old_servers: Sequence[str], holders: dict[int, list[str]],
                   alive: Iterable[str]) -> tuple[list[str] | None, str]:
    """The servers of a resumed job, shard i on a live server holding shard i's checkpoints.

    `old_servers` is the old job's server list if the coordinator knows it (preferred);
    `holders` maps a shard index to the servers that reported holding it. Returns the list,
    or None and what is missing (the job waits).
    """
    alive = set(alive)
    chosen: list[str] = []
    for index in range(n):
        candidates = [old_servers[index]] if index < len(old_servers) else []
        candidates += sorted(holders.get(index, []))
        live = [s for s in candidates if s in alive and s not in chosen]
        if not live:
            who = ", ".join(dict.fromkeys(candidates)) or "no known server"
            return None, f"waiting for the server holding checkpoint shard {index} ({who})"
        chosen.append(live[0])
    return chosen, ""


def state_is_running(state: common_pb2.JobState) -> bool:
    return state == common_pb2.JOB_STATE_RUNNING
