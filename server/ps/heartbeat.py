"""Keeps this server registered with the coordinator (a runtime NodeLink in the SERVER role)
and feeds it the coordinator's job views."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from shardps.proto import common_pb2, coordinator_pb2
from shardps.runtime.nodelink import NodeLink

OnViews = Callable[[Sequence[coordinator_pb2.ServerJobView]], None]
Frozen = Callable[[], list[coordinator_pb2.ShardVersion]]


class Checkpoints(Protocol):
    """What the link needs of the server's Checkpointer (server/ps/checkpointer.py)."""

    def take_reports(self) -> list[coordinator_pb2.ShardVersion]: ...

    def put_back(self, reports: Sequence[coordinator_pb2.ShardVersion]) -> None: ...

    def stored(self) -> list[coordinator_pb2.ShardVersion]: ...

    def save_node_id(self, node_id: str) -> None: ...


class ServerRole:
    """The SERVER role of a NodeLink: what a parameter server tells the coordinator and does
    with its answers. Runs on the link's thread."""

    def __init__(self, address: str, metrics_address: str, on_views: OnViews,
                 checkpoints: Checkpoints | None, frozen: Frozen, caught_up: Frozen):
        self.address = address
        self._caught_up = caught_up
        self.metrics_address = metrics_address
        self._on_views = on_views
        self._checkpoints = checkpoints
        self._frozen = frozen
        # Monotonic seconds at which the last call the coordinator answered was sent (the
        # coordinator saw this server alive no earlier), and of the call now being sent.
        self.contact: float | None = None
        self._sending = 0.0

    def _restored(self) -> list[coordinator_pb2.ShardVersion]:
        return self._checkpoints.take_reports() if self._checkpoints else []

    def registration(self) -> coordinator_pb2.RegisterNodeRequest:
        self._sending = time.monotonic()
        return coordinator_pb2.RegisterNodeRequest(
            role=common_pb2.ROLE_SERVER, address=self.address,
            metrics_address=self.metrics_address, restored=self._restored(),
            stored=self._checkpoints.stored() if self._checkpoints else [],
            frozen=self._frozen())

    def registered(self, reply: coordinator_pb2.RegisterNodeResponse) -> None:
        self.contact = self._sending
        if self._checkpoints is not None:
            self._checkpoints.save_node_id(reply.node_id)
        if reply.jobs:
            self._on_views(reply.jobs)

    def heartbeat(self, lease_ms: int) -> coordinator_pb2.HeartbeatRequest:
        self._sending = time.monotonic()
        return coordinator_pb2.HeartbeatRequest(restored=self._restored(), frozen=self._frozen(),
                                                caught_up=self._caught_up())

    def answered(self, reply: coordinator_pb2.HeartbeatResponse) -> None:
        if not reply.unknown_node:
            self.contact = self._sending
        self._on_views(reply.jobs)

    def forgotten(self) -> None:
        pass  # the restore reports went back in undelivered(); registration carries them

    def undelivered(self, restored: Sequence[coordinator_pb2.ShardVersion]) -> None:
        if restored and self._checkpoints is not None:
            self._checkpoints.put_back(restored)


class CoordinatorLink(NodeLink):
    """Registers as a SERVER, heartbeats every lease/4 and re-registers when forgotten.

    Runs on one daemon thread started by `start()`; `on_views` is called from that thread
    with the views of the registration reply and of every heartbeat. See NodeLink for the
    backoff, the log lines and `stop()` (which ends with the goodbye heartbeat).
    """

    def __init__(self, coordinator: str, address: str, metrics_address: str, on_views: OnViews,
                 node_id: str = "", checkpoints: Checkpoints | None = None,
                 frozen: Frozen | None = None, on_refused: Callable[[str], None] | None = None,
                 caught_up: Frozen | None = None):
        """`node_id`: the id to register under (a restarted server's, from its data dir).
        `checkpoints`: the server's Checkpointer, if it has a data dir: the link reports its
        restores and stored shards to the coordinator and persists the node id.
        `frozen`: the shards of ended jobs frozen where they are, reported with every call
        until the coordinator names their final version.
        `on_refused(message)`: the coordinator refused the registration for good (NodeLink).
        `caught_up`: joining copies caught up with their primary (joining.py), reported with
        every heartbeat until the coordinator makes them backups."""
        self._server_role = ServerRole(address, metrics_address, on_views, checkpoints,
                                       frozen or (lambda: []), caught_up or (lambda: []))
        super().__init__(coordinator, self._server_role,
                         node_id=node_id, thread_name="ps-heartbeat", on_refused=on_refused)

    def start(self) -> CoordinatorLink:
        super().start()
        return self

    def in_touch(self, fraction: float) -> bool:
        """Whether the coordinator answered a call this server sent less than `fraction` of
        a lease ago: until then it cannot have declared this server dead (its lease runs from
        the call's arrival, which is later). Read from any thread (a float, set whole)."""
        contact = self._server_role.contact
        return contact is not None and time.monotonic() - contact < fraction * self.lease_ms / 1000
