"""The data plane's server side: a TCP listener beside the gRPC service, one thread per
connection, serving the Push and Pull frames of proto/dataplane.py through BulkOps.

A pushed gradient is received straight into the shard's staging buffer (checked for NaN/inf
a few MiB at a time, while in cache); a pulled snapshot is copied a few MiB at a time under
the shard's lock into a buffer that is sent outside it, so a slow reader never holds the
shard. Refusals answer with the gRPC status code the RPC would give. A push refused before
its elements were read has them drained when its header declares a sane size (the connection
stays in step), else the connection is closed after the reply.

Waits: hello and everything after the first byte of a request have deadlines; an idle
connection waits for its next request until the client closes it, TCP keepalive finds its
peer gone, or the server stops (which closes every connection).
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
import time

import grpc
import torch
from google.protobuf.message import DecodeError

from shardps.proto import codec, dataplane, ps_pb2, rpc

from .bulk import BulkOps, Refused

log = logging.getLogger("shardps.ps")

HELLO_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256
MAX_DRAIN_BYTES = 1 << 36  # a push header declaring more is not read on; the connection closes
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))


class _Close(Exception):
    """Ends a connection (after whatever reply was due has been sent)."""


class DataServer:
    """Listens on host:port (0 picks one) for data-plane connections.

    Thread-safety: start/stop from one thread; connections run on their own threads.
    """

    def __init__(self, bulk: BulkOps, security: rpc.Security,
                 max_connections: int = MAX_CONNECTIONS):
        self.bulk = bulk
        self.token = security.token
        self.context = dataplane.server_context(security)
        self.max_connections = max_connections
        self.port = 0
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Binds and starts accepting; returns the bound port. Raises OSError."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="data-accept", daemon=True)
        self._acceptor.start()
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        """Stops accepting, closes every connection (a transfer in flight fails) and waits up
        to `grace` s for their threads (a push being applied finishes first)."""
        self._stopping.set()
        if self._listener is not None:
            _shutdown(self._listener)
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _shutdown(conn)
        if self._acceptor is not None:
            self._acceptor.join(grace)
        deadline = time.monotonic() + grace
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="data-conn",
                                      daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    # -- one connection -----------------------------------------------------------------

    def _serve(self, raw: socket.socket) -> None:
        with self._lock:
            full = len(self._connections) >= self.max_connections
            if not full:
                self._connections.add(raw)
        conn = raw
        try:
            dataplane.tune(conn)
            for name, value in _KEEPALIVE:
                if hasattr(socket, name):
                    conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            conn.settimeout(HELLO_TIMEOUT_S)
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
            self._hello(conn, full)
            scratch: dict[torch.dtype, torch.Tensor] = {}
            while not self._stopping.is_set():
                conn.settimeout(None)  # idle: see the module docstring
                head = bytearray(dataplane.FRAME.size)
                view = memoryview(head)
                first = conn.recv_into(view)
                if first == 0:
                    return  # the client closed the connection between requests
                conn.settimeout(rpc.TRANSFER_DEADLINE_S)
                dataplane.recv_exact(conn, view[first:])
                kind, size = dataplane.FRAME.unpack(head)
                if size > dataplane.MAX_BODY_BYTES:
                    raise _Close(f"a request body of {size} bytes")
                body = bytearray(size)
                dataplane.recv_exact(conn, memoryview(body))
                if kind == dataplane.PUSH:
                    self._push(conn, bytes(body))
                elif kind == dataplane.PULL:
                    self._pull(conn, bytes(body), scratch)
                else:
                    _reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, f"unknown request kind {kind}")
                    raise _Close(f"unknown request kind {kind}")
        except _Close as exc:
            log.debug("data connection closed: %s", exc)
        except (OSError, ssl.SSLError) as exc:  # includes timeouts and ConnectionError
            if not self._stopping.is_set():
                log.debug("data connection ended: %s", exc)
        finally:
            with self._lock:
                self._connections.discard(raw)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _hello(self, conn: socket.socket, full: bool) -> None:
        magic = bytearray(len(dataplane.MAGIC) + dataplane.TOKEN_LEN.size)
        dataplane.recv_exact(conn, memoryview(magic))
        if bytes(magic[: len(dataplane.MAGIC)]) != dataplane.MAGIC:
            _reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, "not a shardps data-plane client")
            raise _Close("bad magic")
        (size,) = dataplane.TOKEN_LEN.unpack_from(magic, len(dataplane.MAGIC))
        if size > dataplane.MAX_TOKEN_BYTES:
            _reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, "token too long")
            raise _Close("token too long")
        token = bytearray(size)
        dataplane.recv_exact(conn, memoryview(token))
        if self.token is not None and not hmac.compare_digest(bytes(token), self.token.encode()):
            _reply_error(conn, grpc.StatusCode.UNAUTHENTICATED, rpc.UNAUTHENTICATED_MESSAGE)
            raise _Close("unauthenticated")
        if full:
            _reply_error(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"this server holds {self.max_connections} data connections already")
            raise _Close("too many connections")
        conn.sendall(dataplane.frame(0, b""))

    def _push(self, conn: socket.socket, body: bytes) -> None:
        try:
            header = ps_pb2.PushHeader.FromString(body)
        except DecodeError:
            self.bulk.metrics.rejected.labels("bad_header").inc()
            _reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, "push header does not parse")
            raise _Close("bad push header") from None
        try:
            declared = header.length * codec.element_size(header.dtype)
        except codec.CodecError:
            declared = -1
        consumed = False

        def fill(grad: torch.Tensor) -> tuple[int, bool]:
            nonlocal consumed
            consumed = True
            data = dataplane.as_bytes(grad)
            finite, step = True, dataplane.IO_BYTES
            per_piece = step // grad.element_size()
            for lo in range(0, len(data), step):
                dataplane.recv_exact(conn, data[lo : lo + step])
                if finite:  # each piece while it is in cache
                    first = lo // grad.element_size()
                    finite = codec.pushable(grad[first : first + per_piece])
            return len(data), finite

        try:
            reply: ps_pb2.PushResponse | Refused = self.bulk.push(header, fill)
        except Refused as exc:
            reply = exc
        # The elements not read yet are drained, so the connection stays in step; a size
        # that cannot be trusted closes it after the reply instead.
        in_step = consumed or self._drain(conn, declared)
        if isinstance(reply, Refused):
            _reply_error(conn, reply.code, str(reply))
        elif self.bulk.faults.drop(reply):
            raise _Close("fault injected: push reply dropped")
        else:
            conn.sendall(dataplane.frame(0, reply.SerializeToString()))
        if not in_step:
            raise _Close(f"push declares {declared} bytes")

    def _drain(self, conn: socket.socket, declared: int) -> bool:
        """Reads and discards a push's elements that were not wanted; False (nothing read)
        when the declared size is not one to read on."""
        if not 0 <= declared <= MAX_DRAIN_BYTES:
            return False
        sink = bytearray(min(declared, dataplane.IO_BYTES))
        view = memoryview(sink)
        left = declared
        while left:
            n = min(left, len(sink))
            dataplane.recv_exact(conn, view[:n])
            left -= n
        return True

    def _pull(self, conn: socket.socket, body: bytes, scratch: dict[torch.dtype, torch.Tensor]) -> None:
        try:
            request = ps_pb2.PullRequest.FromString(body)
        except DecodeError:
            _reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, "pull request does not parse")
            raise _Close("bad pull request") from None
        try:
            plan = self.bulk.pull(request, lambda: not self._stopping.is_set())
        except Refused as exc:
            _reply_error(conn, exc.code, str(exc))
            return
        sent = 0
        try:
            conn.sendall(dataplane.frame(0, plan.head.SerializeToString()))
            if plan.snapshot is None:
                return
            step = max(1, dataplane.IO_BYTES // plan.dtype.itemsize)
            buf = scratch.get(plan.dtype)
            if buf is None or buf.numel() < min(step, plan.shard.length):
                buf = scratch[plan.dtype] = torch.empty(min(step, plan.shard.length), dtype=plan.dtype)

            def copy(lo: int, view: torch.Tensor) -> memoryview:
                # The one copy (and cast), under the lock; sent after it is released.
                return dataplane.as_bytes(buf[: view.numel()].copy_(view))

            for piece in self.bulk.pieces(plan, step, copy):
                conn.sendall(piece)
                sent += len(piece)
        finally:
            self.bulk.pulled(plan, sent)


def _reply_error(conn: socket.socket, code: grpc.StatusCode, message: str) -> None:
    body = message.encode()[: dataplane.MAX_BODY_BYTES]
    conn.sendall(dataplane.frame(code.value[0], body))


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
