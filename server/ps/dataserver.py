"""The data plane's server side: a TCP listener beside the gRPC service, serving the Push and
Pull frames of proto/dataplane.py through BulkOps (and the row calls' frames through
rowframes.py), one thread per authenticated connection.

A connection gets its thread only after a valid hello: until then it is one of a bounded
number of sockets that a single thread (runtime/gate.py) takes through the TLS handshake and
the hello without blocking, under one deadline for both (HELLO_DEADLINE_S), the busiest
source's oldest pushed out by newer ones beyond MAX_PENDING. So a client without the token (or without a
client certificate, under mutual TLS) costs at most a socket for a few seconds, never a
thread, and never one of the `max_connections` slots of authenticated connections.

A pushed gradient is received straight into the shard's staging buffer (checked for NaN/inf
a few MiB at a time, while in cache); a pulled snapshot is copied a few MiB at a time under
the shard's lock into a buffer that is sent outside it, so a slow reader never holds the
shard. Refusals answer with the gRPC status code the RPC would give. A push refused before
its elements were read has them drained when its header declares a sane size (the connection
stays in step), else the connection is closed after the reply.

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
from google.protobuf.message import DecodeError

from shardps.proto import codec, dataplane, ps_pb2
from shardps.runtime import callguard, gate, rpc, sslcontext

from . import compressed, forwarding, pieces, rowframes
from .bulk import BulkOps, Refused
from .forwarding import OnPiece
from .rowservice import RowService

log = logging.getLogger("shardps.ps")

HELLO_DEADLINE_S = 5.0   # TLS handshake and hello, from the accept
MAX_PENDING = 128        # connections in their handshake or hello (see runtime/gate.py)
MAX_CONNECTIONS = 256    # authenticated connections, a thread each
IDLE_S = 600.0           # an authenticated connection's wait for its next request
MAX_DRAIN_BYTES = 1 << 36  # a push header declaring more is not read on; the connection closes
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))
_HELLO_HEAD = len(dataplane.MAGIC) + dataplane.TOKEN_LEN.size


class _Close(Exception):
    """Ends a connection (after whatever reply was due has been sent)."""


class DataServer:
    """Listens on host:port (0 picks one) for data-plane connections.

    Thread-safety: start/stop from one thread; hellos run on the gate's thread and each
    authenticated connection on its own.
    """

    def __init__(self, bulk: BulkOps, security: rpc.Security,
                 max_connections: int = MAX_CONNECTIONS, max_pending: int = MAX_PENDING,
                 hello_deadline_s: float = HELLO_DEADLINE_S, rows: RowService | None = None):
        """`rows`: the row calls' service (rowframes.py), None to serve Push and Pull only."""
        self.bulk = bulk
        self.rows = rows
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
                    raise _Close(f"idle for {IDLE_S:g} s") from None
                if first == 0:
                    return  # the client closed the connection between requests
                deadline = dataplane.Deadline(rpc.TRANSFER_DEADLINE_S, callguard.CLIENT_WAIT_S)
                dataplane.recv_exact(conn, view[first:], deadline)
                kind, size = dataplane.FRAME.unpack(head)
                rows = self.rows is not None and kind in dataplane.ROW_KINDS
                limit = dataplane.MAX_ROWS_BODY_BYTES if rows else dataplane.MAX_BODY_BYTES
                if size > limit:
                    if rows:  # as gRPC refuses a message over its limit
                        _reply_error(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"a request of {size} bytes (at most {limit})", deadline)
                    raise _Close(f"a request body of {size} bytes")
                body = bytearray(size)
                dataplane.recv_exact(conn, memoryview(body), deadline)
                if rows and self.rows is not None:
                    reply = rowframes.answer(self.rows, kind, bytes(body),
                                             lambda: not self._stopping.is_set())
                    dataplane.send_all(conn, reply, deadline)
                elif kind == dataplane.PUSH:
                    self._push(conn, bytes(body), deadline)
                elif kind == dataplane.PULL:
                    self._pull(conn, bytes(body), scratch, deadline)
                else:
                    _reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, f"unknown request kind {kind}", deadline)
                    raise _Close(f"unknown request kind {kind}")
        except _Close as exc:
            log.debug("data connection closed: %s", exc)
        except TimeoutError as exc:  # a request that waited on its client past a limit
            if not self._stopping.is_set():
                log.info("data connection from %s ended: a request waited on the client too long (%s)",
                         peer, exc)
        except OSError as exc:  # includes timeouts, ConnectionError and ssl.SSLError
            if not self._stopping.is_set():
                log.debug("data connection ended: %s", exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _push(self, conn: socket.socket, body: bytes, deadline: dataplane.Deadline) -> None:
        try:
            header = ps_pb2.PushHeader.FromString(body)
        except DecodeError:
            self.bulk.metrics.rejected.labels("bad_header").inc()
            _reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, "push header does not parse", deadline)
            raise _Close("bad push header") from None
        declared = compressed.body_bytes(header)
        consumed = False

        def fill(grad: torch.Tensor, on_piece: OnPiece | None) -> tuple[int, bool]:
            nonlocal consumed
            consumed = True
            if compressed.is_compressed(header):  # bytes bounded by bulk.push's check_header
                body = bytearray(header.compressed_bytes)
                dataplane.recv_exact(conn, memoryview(body), deadline)
                return compressed.decode_into(header, body, grad)
            if header.pieces:  # an overlapped push: pieces in any order
                return pieces.fill(conn, header, grad, deadline, on_piece)
            data = dataplane.as_bytes(grad)
            finite = True
            step = dataplane.IO_BYTES if on_piece is None else forwarding.PIECE_BYTES
            per_piece = step // grad.element_size()
            for lo in range(0, len(data), step):
                dataplane.recv_exact(conn, data[lo : lo + step], deadline)
                first = lo // grad.element_size()
                if finite:  # each piece while it is in cache
                    finite = codec.pushable(grad[first : first + per_piece])
                if on_piece is not None and finite:  # on to the backups (cut-through)
                    on_piece(first, min(first + per_piece, grad.numel()))
            return len(data), finite

        try:
            reply: ps_pb2.PushResponse | Refused = self.bulk.push(header, fill)
        except Refused as exc:
            reply = exc
        # The elements not read yet are drained, so the connection stays in step; a size
        # that cannot be trusted closes it after the reply instead.
        in_step = consumed or self._drain(conn, declared, deadline)
        if isinstance(reply, Refused):
            _reply_error(conn, reply.code, str(reply), deadline)
        elif self.bulk.faults.drop(reply):
            raise _Close("fault injected: push reply dropped")
        else:
            dataplane.send_all(conn, dataplane.frame(0, reply.SerializeToString()), deadline)
        if not in_step:
            raise _Close(f"push declares {declared} bytes")

    def _drain(self, conn: socket.socket, declared: int, deadline: dataplane.Deadline) -> bool:
        """Reads and discards a push's elements that were not wanted; False (nothing read)
        when the declared size is not one to read on."""
        if not 0 <= declared <= MAX_DRAIN_BYTES:
            return False
        sink = bytearray(min(declared, dataplane.IO_BYTES))
        view = memoryview(sink)
        left = declared
        while left:
            n = min(left, len(sink))
            dataplane.recv_exact(conn, view[:n], deadline)
            left -= n
        return True

    def _pull(self, conn: socket.socket, body: bytes, scratch: dict[torch.dtype, torch.Tensor],
              deadline: dataplane.Deadline) -> None:
        try:
            request = ps_pb2.PullRequest.FromString(body)
        except DecodeError:
            _reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, "pull request does not parse", deadline)
            raise _Close("bad pull request") from None
        try:
            plan = self.bulk.pull(request, lambda: not self._stopping.is_set())
        except Refused as exc:
            _reply_error(conn, exc.code, str(exc), deadline)
            return
        sent = 0
        try:
            dataplane.send_all(conn, dataplane.frame(0, plan.head.SerializeToString()), deadline)
            if plan.snapshot is None:
                return
            if plan.delta is not None:  # a compressed pull: the encoding instead of elements
                dataplane.send_all(conn, plan.delta, deadline)
                sent = len(plan.delta)
                return
            step = max(1, dataplane.IO_BYTES // plan.dtype.itemsize)
            buf = scratch.get(plan.dtype)
            if buf is None or buf.numel() < min(step, plan.shard.length):
                buf = scratch[plan.dtype] = torch.empty(min(step, plan.shard.length), dtype=plan.dtype)

            def copy(lo: int, view: torch.Tensor) -> memoryview:
                # The one copy (and cast), under the lock; sent after it is released.
                return dataplane.as_bytes(buf[: view.numel()].copy_(view))

            for piece in self.bulk.pieces(plan, step, copy):
                dataplane.send_all(conn, piece, deadline)
                sent += len(piece)
        finally:
            self.bulk.pulled(plan, sent)


_error = rowframes.error_frame


def _reply_error(conn: socket.socket, code: grpc.StatusCode, message: str,
                 deadline: dataplane.Deadline) -> None:
    dataplane.send_all(conn, _error(code, message), deadline)


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
