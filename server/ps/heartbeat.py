"""Keeps this server registered with the coordinator and feeds it the coordinator's job views."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from shardps.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from shardps.runtime import daemon, rpc

log = logging.getLogger("shardps.ps")

DEFAULT_LEASE_MS = 5000        # until the coordinator tells us its lease
_MIN_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 5.0
_FINAL_HEARTBEAT_DEADLINE_S = 2.0

OnViews = Callable[[Sequence[coordinator_pb2.ServerJobView]], None]


class CoordinatorLink:
    """Registers as a SERVER, heartbeats every lease/4 and re-registers when forgotten.

    Runs on one daemon thread started by `start()`; `on_views` is called from that thread
    with every heartbeat's ServerJobViews. An unreachable coordinator is retried with
    exponential backoff (logged once per outage); nothing here blocks longer than one RPC
    deadline. `stop()` ends the thread and sends a last heartbeat with shutting_down=True.
    """

    def __init__(self, coordinator: str, address: str, metrics_address: str, on_views: OnViews,
                 node_id: str = "", checkpoints: Any = None,
                 frozen: Callable[[], list[coordinator_pb2.ShardVersion]] | None = None):
        """`node_id`: the id to register under (a restarted server's, from its data dir).
        `checkpoints`: the server's Checkpointer, if it has a data dir: the link reports its
        restores and stored shards to the coordinator and persists the node id.
        `frozen`: the shards of ended jobs frozen where they are, reported with every call
        until the coordinator names their final version."""
        self._frozen = frozen or (lambda: [])
        self.coordinator = coordinator
        self.address = address
        self.metrics_address = metrics_address
        self.node_id = node_id
        self._checkpoints = checkpoints
        self.incarnation = 0
        self.lease_ms = DEFAULT_LEASE_MS
        self._on_views = on_views
        self._registered = False
        self._failing = False
        self._channel = rpc.make_channel(coordinator)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ps-heartbeat", daemon=True)

    @property
    def registered(self) -> bool:
        return self._registered

    def start(self) -> CoordinatorLink:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops heartbeating; tells the coordinator we are going (best effort, bounded)."""
        self._stop.set()
        self._thread.join(self._deadline_s() + 1.0)
        if self._registered:
            try:
                self._stub.Heartbeat(
                    coordinator_pb2.HeartbeatRequest(node_id=self.node_id,
                                                     incarnation=self.incarnation,
                                                     shutting_down=True),
                    # The channel may be between reconnect attempts (the coordinator just
                    # restarted): wait for it, within the deadline, instead of failing fast.
                    timeout=_FINAL_HEARTBEAT_DEADLINE_S, wait_for_ready=True)
                log.info("deregistered %s from coordinator %s", self.node_id, self.coordinator)
            except grpc.RpcError as exc:
                log.warning("final heartbeat to %s failed: %s", self.coordinator, exc.code())
        self._channel.close()

    def _deadline_s(self) -> float:
        # A heartbeat answered after the lease ran out is worthless.
        return min(rpc.CONTROL_DEADLINE_S, self.lease_ms / 2000)

    def _run(self) -> None:
        backoff = _MIN_BACKOFF_S
        while not self._stop.is_set():
            try:
                if not self._registered:
                    self._register()
                delay = self._heartbeat()
                backoff = _MIN_BACKOFF_S
                if self._failing:
                    log.info("coordinator %s reachable again", self.coordinator)
                    self._failing = False
            except grpc.RpcError as exc:
                if not self._failing:
                    log.warning("coordinator %s unreachable (%s); retrying every <= %.0f s",
                                self.coordinator, exc.code(), _MAX_BACKOFF_S)
                    self._failing = True
                delay = backoff
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except Exception:  # a bug in applying views must not end the lease thread
                log.exception("heartbeat handling failed")
                delay = self.lease_ms / 4000
            self._stop.wait(delay)

    def _register(self) -> None:
        restored = self._checkpoints.take_reports() if self._checkpoints else []
        stored = self._checkpoints.stored() if self._checkpoints else []
        try:
            reply = self._stub.RegisterNode(
                coordinator_pb2.RegisterNodeRequest(
                    role=common_pb2.ROLE_SERVER, address=self.address, node_id=self.node_id,
                    metrics_address=self.metrics_address, hostname=socket.gethostname(),
                    restored=restored, stored=stored, frozen=self._frozen()),
                timeout=rpc.CONTROL_DEADLINE_S)
        except grpc.RpcError:
            if restored:
                self._checkpoints.put_back(restored)
            raise
        if self._checkpoints is not None:
            self._checkpoints.save_node_id(reply.node_id)
        self.node_id = reply.node_id
        daemon.set_log_node(self.node_id)
        self.incarnation = reply.incarnation
        self.lease_ms = reply.lease_ms or DEFAULT_LEASE_MS
        self._registered = True
        log.info("registered with coordinator %s as %s (incarnation %d, lease %d ms)",
                 self.coordinator, self.node_id, self.incarnation, self.lease_ms)
        if reply.jobs:
            self._on_views(reply.jobs)

    def _heartbeat(self) -> float:
        """One heartbeat; returns the seconds until the next one."""
        restored = self._checkpoints.take_reports() if self._checkpoints else []
        try:
            reply = self._stub.Heartbeat(
                coordinator_pb2.HeartbeatRequest(node_id=self.node_id,
                                                 incarnation=self.incarnation,
                                                 restored=restored, frozen=self._frozen()),
                timeout=self._deadline_s())
        except grpc.RpcError:
            if restored:
                self._checkpoints.put_back(restored)
            raise
        if reply.unknown_node:
            if restored:
                self._checkpoints.put_back(restored)  # tell them at registration instead
            log.warning("coordinator %s does not know %s (incarnation %d); registering again",
                        self.coordinator, self.node_id, self.incarnation)
            self._registered = False
            return 0.0
        if reply.lease_ms:
            self.lease_ms = reply.lease_ms
        self._on_views(reply.jobs)
        return self.lease_ms / 4000
