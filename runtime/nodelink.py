"""A daemon's link to the coordinator, shared by the parameter server and the worker: register,
heartbeat within the lease, register again (under the same id) when the coordinator has
forgotten the node or restarted, and say goodbye on stop. What differs by role is a NodeRole."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, cast

import grpc

from shardps.proto import coordinator_pb2, coordinator_pb2_grpc
from shardps.runtime import daemon, rpc
from shardps.runtime.backoff import Backoff

log = logging.getLogger(__name__)

DEFAULT_LEASE_MS = 5000    # until the coordinator tells us its lease
FIRST_BACKOFF_S = 0.25     # pauses while the coordinator is unreachable double from this ...
MAX_BACKOFF_S = 5.0        # ... up to this (a restarted coordinator is found within it);
                           # a registered node's pauses stay within lease/4
MIN_DEADLINE_S = 0.5       # a heartbeat's deadline is half the lease, but at least this
GOODBYE_DEADLINE_S = 2.0   # deadline of the last heartbeat (shutting_down)

# Refusals of a registration that no retry can turn around: the request is made of the
# daemon's own flags and node id, and is sent again unchanged (the coordinator answers a
# malformed id, another role's id or an over-long address with INVALID_ARGUMENT). Everything
# else (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAUTHENTICATED while tokens are
# being changed, FAILED_PRECONDITION that depends on the coordinator's state) is retried.
PERMANENT_REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.ALREADY_EXISTS,
                                grpc.StatusCode.PERMISSION_DENIED})

_Reply = TypeVar("_Reply", coordinator_pb2.RegisterNodeResponse,
                 coordinator_pb2.HeartbeatResponse)


class NodeRole(Protocol):
    """The role-specific part of a node's link. Every method runs on the link's thread."""

    def registration(self) -> coordinator_pb2.RegisterNodeRequest:
        """The role's part of a RegisterNode request (role, addresses, what it holds); the
        link fills in node_id and hostname."""
        ...

    def registered(self, reply: coordinator_pb2.RegisterNodeResponse) -> None:
        """Registration succeeded; the link already holds the reply's id, incarnation, lease."""
        ...

    def heartbeat(self, lease_ms: int) -> coordinator_pb2.HeartbeatRequest:
        """The role's part of the next heartbeat (reports it carries, a long-poll's
        wait_for_assignment_ms); the link fills in node_id and incarnation."""
        ...

    def answered(self, reply: coordinator_pb2.HeartbeatResponse) -> None:
        """The coordinator's answer to a heartbeat of a node it knows."""
        ...

    def forgotten(self) -> None:
        """The coordinator no longer knows this incarnation; the link registers again next."""
        ...

    def undelivered(self, restored: Sequence[coordinator_pb2.ShardVersion]) -> None:
        """A call carrying these restore reports failed or was refused: keep them for the next."""
        ...


class NodeLink:
    """Registers `role` with the coordinator and heartbeats every lease/4 on one daemon thread.

    An unreachable coordinator is retried with a Backoff (FIRST_BACKOFF_S doubling to
    MAX_BACKOFF_S), forever, with one log line when an outage starts and one when it ends. A
    registration refused for good (PERMANENT_REFUSALS) ends the link instead, logged and told
    to `on_refused(message)` (without one, it is retried like an outage). A
    heartbeat with wait_for_assignment_ms is a long-poll the coordinator may hold that long;
    `halt()` cancels the call in flight, so stopping never waits out a hold. A node the
    coordinator has forgotten registers again under its id. Thread-safety: `start`, `halt`,
    `stop`, `register_again` and the properties from any thread; the role runs on the link's.
    The link owns its channel; `stub` may be used by others on the same channel until `stop()`.
    """

    def __init__(self, coordinator: str, role: NodeRole, node_id: str = "",
                 thread_name: str = "heartbeat",
                 on_refused: Callable[[str], None] | None = None):
        """`node_id`: the id to register under ("" the first time; a restarted server's own).
        `on_refused(message)`: called on the link's thread, which then ends, when the
        coordinator refuses the registration for good; the daemon should exit."""
        self.coordinator = coordinator
        self._role = role
        self._lock = threading.Lock()
        self._node_id = node_id
        self._on_refused = on_refused
        self._incarnation = 0
        self.lease_ms = DEFAULT_LEASE_MS
        self._registered = False
        self._failing = False
        self._closed = False
        self._call: grpc.Future | None = None  # the call in flight, cancelled by halt()
        self._stop = threading.Event()
        self._backoff = Backoff(FIRST_BACKOFF_S, MAX_BACKOFF_S)
        self._channel = rpc.make_channel(coordinator)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    @property
    def node_id(self) -> str:
        with self._lock:
            return self._node_id

    @property
    def incarnation(self) -> int:
        with self._lock:
            return self._incarnation

    @property
    def registered(self) -> bool:
        with self._lock:
            return self._registered

    @property
    def running(self) -> bool:
        """The link's thread is alive (started and not yet ended by halt())."""
        return self._thread.is_alive()

    def start(self) -> NodeLink:
        self._thread.start()
        return self

    def register_again(self, incarnation: int) -> None:
        """Registers anew before the next heartbeat, unless the link already has since
        `incarnation` (a server fenced that incarnation off: the coordinator declared it dead)."""
        with self._lock:
            if incarnation == self._incarnation:
                self._registered = False

    def halt(self) -> None:
        """Ends heartbeating now: the call in flight (a held long-poll) is cancelled. Idempotent."""
        with self._lock:
            self._stop.set()
            call = self._call
        if call is not None:
            call.cancel()

    def stop(self) -> None:
        """halt(), waits for the link's thread (bounded), says goodbye (a heartbeat with
        shutting_down: the coordinator marks the node DEAD at once) and closes the channel.
        Best effort and bounded; idempotent."""
        self.halt()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.ident is not None:
            self._thread.join(rpc.CONTROL_DEADLINE_S)
        if self.registered:
            try:
                self.stub.Heartbeat(
                    coordinator_pb2.HeartbeatRequest(node_id=self.node_id,
                                                     incarnation=self.incarnation,
                                                     shutting_down=True),
                    # The channel may be between reconnect attempts (the coordinator just
                    # restarted): wait for it, within the deadline, instead of failing fast.
                    timeout=GOODBYE_DEADLINE_S, wait_for_ready=True)
                log.info("said goodbye to coordinator %s as %s", self.coordinator, self.node_id)
            except grpc.RpcError as exc:
                log.warning("goodbye to coordinator %s failed: %s", self.coordinator,
                            exc.code().name)
        self._channel.close()

    # -- the link's thread --

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                if not self.registered:
                    self._register()
                pause = self._heartbeat(began)
            except grpc.FutureCancelledError:
                return  # by halt()
            except grpc.RpcError as exc:
                if self._refused_for_good(exc):
                    return
                pause = self._outage(exc)
            except Exception:  # a bug in the role's handling must not end the lease
                log.exception("handling the coordinator's reply failed")
                pause = self.lease_ms / 4000
            self._stop.wait(pause)

    def _deadline_s(self) -> float:
        # A heartbeat answered after the lease has run out is worthless.
        return min(rpc.CONTROL_DEADLINE_S, max(self.lease_ms / 2000, MIN_DEADLINE_S))

    def _send(self, start: Callable[[], grpc.Future], reply_type: type[_Reply]) -> _Reply:
        """Starts a call unless halted, and waits for it; halt() cancels it meanwhile."""
        with self._lock:
            if self._stop.is_set():
                raise grpc.FutureCancelledError()
            call = self._call = start()
        try:
            return cast(_Reply, call.result())
        finally:
            with self._lock:
                self._call = None

    def _register(self) -> None:
        request = self._role.registration()
        request.node_id, request.hostname = self.node_id, socket.gethostname()
        try:
            reply = self._send(lambda: self.stub.RegisterNode.future(
                request, timeout=rpc.CONTROL_DEADLINE_S), coordinator_pb2.RegisterNodeResponse)
        except (grpc.RpcError, grpc.FutureCancelledError):
            self._role.undelivered(request.restored)
            raise
        with self._lock:
            self._node_id, self._incarnation = reply.node_id, reply.incarnation
            self.lease_ms = reply.lease_ms or DEFAULT_LEASE_MS
            self._registered = True
        daemon.set_log_node(reply.node_id)
        self._reachable()
        log.info("registered with coordinator %s as %s (incarnation %d, lease %d ms)",
                 self.coordinator, reply.node_id, reply.incarnation, self.lease_ms)
        self._role.registered(reply)

    def _heartbeat(self, began: float) -> float:
        """One heartbeat; returns the pause until the next (lease/4 after `began`)."""
        request = self._role.heartbeat(self.lease_ms)
        request.node_id, request.incarnation = self.node_id, self.incarnation
        timeout = self._deadline_s() + request.wait_for_assignment_ms / 1000
        try:
            reply = self._send(lambda: self.stub.Heartbeat.future(request, timeout=timeout),
                               coordinator_pb2.HeartbeatResponse)
        except (grpc.RpcError, grpc.FutureCancelledError):
            self._role.undelivered(request.restored)
            raise
        self._reachable()
        if reply.unknown_node:
            self._role.undelivered(request.restored)  # told at registration instead
            log.warning("coordinator %s does not know %s (incarnation %d); registering again",
                        self.coordinator, request.node_id, request.incarnation)
            self.register_again(request.incarnation)
            self._role.forgotten()
            return 0.0
        if reply.lease_ms > 0:
            self.lease_ms = reply.lease_ms
        self._role.answered(reply)
        return max(0.0, self.lease_ms / 4000 - (time.monotonic() - began))

    def _refused_for_good(self, exc: grpc.RpcError) -> bool:
        """Whether `exc` refused the registration for good; if so, tells on_refused."""
        if self._on_refused is None or self.registered or exc.code() not in PERMANENT_REFUSALS:
            return False
        node = f" as {self.node_id}" if self.node_id else ""
        message = (f"coordinator {self.coordinator} refuses to register this node{node} "
                   f"({exc.code().name}: {exc.details()}); retrying cannot change that")
        log.error("%s", message)
        self._on_refused(message)
        return True

    def _reachable(self) -> None:
        self._backoff.reset()
        if self._failing:
            log.info("coordinator %s reachable again", self.coordinator)
            self._failing = False

    def _outage(self, exc: grpc.RpcError) -> float:
        """The pause after a failed call; logs the outage once, when it starts."""
        if not self._failing:
            log.warning("coordinator %s unreachable (%s: %s); retrying every <= %.0f s",
                        self.coordinator, exc.code().name, exc.details(), MAX_BACKOFF_S)
            self._failing = True
        pause = self._backoff.next()
        if self.registered:  # the lease runs on: a slow coordinator must hear from us in time
            pause = min(pause, self.lease_ms / 4000)
        return pause
