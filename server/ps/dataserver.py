"""The data plane's server side: a TCP listener beside the gRPC service, serving the Push and
Pull frames of proto/dataplane.py (bulkframes.py, also on the same-host path of shmserve.py)
and the row calls' frames (rowframes.py), one thread per authenticated connection.

A connection gets its thread only after a valid hello: until then it is one of a bounded
number of sockets that a single thread (runtime/gate.py) takes through the TLS handshake and
the hello without blocking, under one deadline for both (HELLO_DEADLINE_S), the busiest
source's oldest pushed out by newer ones beyond MAX_PENDING. So a client without the token (or without a
client certificate, under mutual TLS) costs at most a socket for a few seconds, never a
thread, and never one of the `max_connections` slots of authenticated connections.

Refusals answer with the gRPC status code the RPC would give.

Waits, all with server-side limits: the hello as above; a request, from its first byte to
its reply's last, within rpc.TRANSFER_DEADLINE_S with no wait on the client longer than
callguard.CLIENT_WAIT_S; an idle connection's next request within IDLE_S (clients notice an
idle connection the server closed, and open another). TCP keepalive finds a vanished peer
sooner.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time

import grpc
import torch

from shardps.proto import dataplane
from shardps.runtime import callguard, gate, rpc, shm, sslcontext

from . import rowframes, shmserve
from .bulk import BulkOps
from .bulkframes import BulkFrames, CloseConnection, reply_error
from .rowservice import RowService
from .shmserve import ShmError, ShmLink

log = logging.getLogger("shardps.ps")

HELLO_DEADLINE_S = 5.0   # TLS handshake and hello, from the accept
MAX_PENDING = 128        # connections in their handshake or hello (see runtime/gate.py)
MAX_CONNECTIONS = 256    # authenticated connections, a thread each
IDLE_S = 600.0           # an authenticated connection's wait for its next request
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))
_HELLO_HEAD = len(dataplane.MAGIC) + dataplane.TOKEN_LEN.size


class DataServer:
    """Listens on host:port (0 picks one) for data-plane connections.

    Thread-safety: start/stop from one thread; hellos run on the gate's thread and each
    authenticated connection on its own.
    """

    def __init__(self, bulk: BulkOps, security: rpc.Security,
                 max_connections: int = MAX_CONNECTIONS, max_pending: int = MAX_PENDING,
                 hello_deadline_s: float = HELLO_DEADLINE_S, rows: RowService | None = None,
                 shared_memory: bool = True):
        """`rows`: the row calls' service (rowframes.py), None to serve Push and Pull only;
        `shared_memory`: offer loopback clients the same-host path (shmserve.py)."""
        self.bulk = bulk
        self.frames = BulkFrames(bulk, lambda: not self._stopping.is_set())
        self.rows = rows
        self.shared_memory = shared_memory
        self._shm_budget = shmserve.Budget(self._shm_total, bulk.metrics.shm_segment_bytes)
        self.token = security.token.encode() if security.token else None
        self.context = sslcontext.server_context(security)
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.hello_deadline_s = hello_deadline_s
        self.port = 0
        self.gate: gate.Gate | None = None
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self, host: str, port: int) -> int:
        """Binds and starts accepting; returns the bound port. Raises OSError."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        self.port = listener.getsockname()[1]
        if self.shared_memory and shm.sweep():
            log.info("data plane: removed shared-memory segments of processes that are gone")
        self.gate = gate.Gate(listener, self._hello, name="data-accept", context=self.context,
                              deadline_s=self.hello_deadline_s, max_pending=self.max_pending)
        self.gate.start()
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        """Stops accepting, closes every connection (a transfer in flight fails) and waits up
        to `grace` s for their threads (a push being applied finishes first)."""
        self._stopping.set()
        if self.gate is not None:
            self.gate.stop(grace)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _shutdown(conn)
        deadline = time.monotonic() + grace
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the hello, on the gate's thread --------------------------------------------------

    def _hello(self, data: bytes) -> int | gate.Reply | gate.Handoff:
        """The next step of a connection's hello, from the bytes it has sent so far."""
        magic = dataplane.MAGIC
        if data[: len(magic)] != magic[: len(data)]:
            return gate.Reply(_error(grpc.StatusCode.INVALID_ARGUMENT, "not a shardps data-plane client"))
        if len(data) < _HELLO_HEAD:
            return _HELLO_HEAD - len(data)
        (size,) = dataplane.TOKEN_LEN.unpack_from(data, len(magic))
        if size > dataplane.MAX_TOKEN_BYTES:
            return gate.Reply(_error(grpc.StatusCode.INVALID_ARGUMENT, "token too long"))
        if len(data) < _HELLO_HEAD + size:
            return _HELLO_HEAD + size - len(data)
        if self.token is not None and not hmac.compare_digest(data[_HELLO_HEAD:], self.token):
            return gate.Reply(_error(grpc.StatusCode.UNAUTHENTICATED, rpc.UNAUTHENTICATED_MESSAGE))
        with self._lock:
            full = len(self._connections) >= self.max_connections
        if full or self._stopping.is_set():
            return gate.Reply(_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"this server holds {self.max_connections} data connections already"))
        return gate.Handoff(self._admit)

    def _admit(self, conn: socket.socket) -> None:
        """Gives an authenticated connection its thread."""
        thread = threading.Thread(target=self._serve, args=(conn,), name="data-conn", daemon=True)
        with self._lock:
            self._connections.add(conn)
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: refuse this one, keep serving the others
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(thread)
            log.warning("data plane: cannot start a connection thread")
            conn.close()

    # -- one authenticated connection --------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        peer = _peer(conn)
        link = (ShmLink(self._shm_limit, self._shm_budget, self.bulk.metrics.shm_segments)
                if self.shared_memory and shmserve.offered(conn) else None)
        try:
            dataplane.tune(conn)
            for name, value in _KEEPALIVE:
                if hasattr(socket, name):
                    conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            conn.settimeout(callguard.CLIENT_WAIT_S)
            conn.sendall(dataplane.frame(0, b""))  # the hello's OK
            scratch: dict[torch.dtype, torch.Tensor] = {}
            while not self._stopping.is_set():
                conn.settimeout(IDLE_S)
                head = bytearray(dataplane.FRAME.size)
                view = memoryview(head)
                try:
                    first = conn.recv_into(view)
                except TimeoutError:
                    raise CloseConnection(f"idle for {IDLE_S:g} s") from None
                if first == 0:
                    return  # the client closed the connection between requests
                deadline = dataplane.Deadline(rpc.TRANSFER_DEADLINE_S, callguard.CLIENT_WAIT_S)
                dataplane.recv_exact(conn, view[first:], deadline)
                kind, size = dataplane.FRAME.unpack(head)
                rows = self.rows is not None and kind in dataplane.ROW_KINDS
                limit = dataplane.MAX_ROWS_BODY_BYTES if rows else dataplane.MAX_BODY_BYTES
                if size > limit:
                    if rows:  # as gRPC refuses a message over its limit
                        reply_error(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"a request of {size} bytes (at most {limit})", deadline)
                    raise CloseConnection(f"a request body of {size} bytes")
                body = bytearray(size)
                dataplane.recv_exact(conn, memoryview(body), deadline)
                if rows and self.rows is not None:
                    reply = rowframes.answer(self.rows, kind, bytes(body),
                                             lambda: not self._stopping.is_set())
                    dataplane.send_all(conn, reply, deadline)
                elif kind == dataplane.PUSH:
                    self.frames.push(conn, bytes(body), deadline)
                elif kind == dataplane.PULL:
                    self.frames.pull(conn, bytes(body), scratch, deadline)
                else:
                    self._other(conn, link, kind, bytes(body), scratch, deadline)
        except CloseConnection as exc:
            log.debug("data connection closed: %s", exc)
        except TimeoutError as exc:  # a request that waited on its client past a limit
            if not self._stopping.is_set():
                log.info("data connection from %s ended: a request waited on the client too long (%s)",
                         peer, exc)
        except OSError as exc:  # includes timeouts, ConnectionError and ssl.SSLError
            if not self._stopping.is_set():
                log.debug("data connection ended: %s", exc)
        finally:
            if link is not None:
                link.close()
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _other(self, conn: socket.socket, link: ShmLink | None, kind: int, body: bytes,
               scratch: dict[torch.dtype, torch.Tensor], deadline: dataplane.Deadline) -> None:
        """The same-host path's requests (shmserve.py), or a kind this connection does not
        take; a bad one is answered, then closes. Without `link` (not offered here) an
        SHM_OPEN is declined and the other kinds of the path are unknown."""
        try:
            if kind == dataplane.SHM_OPEN:
                reply = link.open(body) if link is not None else b""
                dataplane.send_all(conn, dataplane.frame(0, reply), deadline)
            elif link is not None and kind == dataplane.SHM_CONFIRM:
                link.confirm(body)
                dataplane.send_all(conn, dataplane.frame(0, b""), deadline)
            elif link is not None and kind == dataplane.PUSH_SHM:
                self.frames.push(conn, body, deadline, link)
            elif link is not None and kind == dataplane.PULL_SHM:
                self.frames.pull(conn, body, scratch, deadline, link)
            else:
                raise ShmError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown request kind {kind}")
        except ShmError as exc:
            reply_error(conn, exc.code, str(exc), deadline)
            raise CloseConnection(str(exc)) from None

    def _shm_limit(self) -> int:
        """The largest segment to make: the largest shard this server holds, in fp32."""
        return 4 * max((s.length for s in self.bulk.shards.shards()), default=0)

    def _shm_total(self) -> int:
        """What all its segments may hold: BUDGET_SHARDS x its shards' fp32 bytes."""
        return shmserve.BUDGET_SHARDS * 4 * sum(s.length for s in self.bulk.shards.shards())


_error = rowframes.error_frame


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
