"""The data plane: Push and Pull as raw frames over TCP, beside the gRPC service.

gRPC Python copies every bulk byte several times on its way (bench/RESULTS.md, `wire`); here
a push goes from the worker's gradient tensor straight to the kernel and from the kernel
straight into the server's staging buffer, and a pull lands straight in the worker's flat
weights. Control stays on gRPC: a server names its data port in the GetDataPlane RPC, and a
server without one (`--data-port -1`) is reached through the Push and Pull RPCs, which mean
exactly the same. Errors come back as gRPC status codes and messages (`DataPlaneError` is a
grpc.RpcError), so callers handle both paths alike.

Wire format (little-endian); one request at a time per connection:

  hello    client: MAGIC, u32 n, n bytes of token (UTF-8; empty without one)
           server: a reply with code 0 and an empty body, or a refusal and close
  request  u8 kind (PUSH or PULL), u32 n, n bytes of PushHeader or PullRequest (protobuf);
           a push then sends exactly header.length elements in header.dtype
  reply    u8 code (the number of a grpc.StatusCode, 0 = OK), u32 n, n bytes: the
           PushResponse or PullResponse (code 0) or a UTF-8 message (any other code); a
           ready pull's reply is followed by its `length` elements in the requested dtype

With TLS configured (rpc.Security) the socket is TLS with the process's certificates and CA,
as its gRPC channels and servers are; the token is checked at hello. Every blocking socket
call has a timeout; a connection that fails mid-frame is closed, never reused.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import tempfile
import time
from pathlib import Path

import grpc
import torch

from shardps.proto import codec, ps_pb2, rpc

PROTOCOL = 1
MAGIC = b"SPSDATA1"
PUSH, PULL = 1, 2
FRAME = struct.Struct("<BI")  # kind or code, body length
TOKEN_LEN = struct.Struct("<I")
MAX_BODY_BYTES = 64 * 1024       # headers, replies and error messages are small
MAX_TOKEN_BYTES = 4096
IO_BYTES = 4 * 1024 * 1024       # bytes per recv_into / per cast slice
CONNECT_TIMEOUT_S = 5.0
BUFFER_BYTES = 4 * 1024 * 1024   # socket send and receive buffers

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class DataPlaneError(grpc.RpcError):
    """A data-plane call that failed, with a gRPC status code and message like an RPC's."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def status_code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def as_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    return t.view(torch.uint8).numpy().data


class Deadline:
    """A whole exchange's deadline, with a limit on each wait within it (`wait_s`, optional):
    `timeout()` is the socket timeout for the next blocking call."""

    def __init__(self, total_s: float, wait_s: float | None = None):
        self.at = time.monotonic() + total_s
        self.wait_s = wait_s

    def timeout(self) -> float:
        """Seconds the next blocking call may take; raises TimeoutError once past."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return min(left, self.wait_s) if self.wait_s is not None else left


def recv_exact(sock: socket.socket, view: memoryview, deadline: Deadline | None = None) -> None:
    """Fills `view` from the socket; raises ConnectionError if the peer closes first. With a
    deadline, each receive gets its timeout from it (else the socket's own applies)."""
    got, size = 0, len(view)
    while got < size:
        if deadline is not None:
            sock.settimeout(deadline.timeout())
        n = sock.recv_into(view[got:], min(size - got, IO_BYTES))
        if n == 0:
            raise ConnectionError("connection closed by the peer")
        got += n


def send_all(sock: socket.socket, data: bytes | memoryview, deadline: Deadline) -> None:
    """Sends all of `data` (IO_BYTES at a time, each within the deadline's limits)."""
    view = memoryview(data).cast("B")
    for lo in range(0, len(view), IO_BYTES):
        sock.settimeout(deadline.timeout())
        sock.sendall(view[lo : lo + IO_BYTES])


def recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One frame head and body; raises ConnectionError if the body is over MAX_BODY_BYTES."""
    head = bytearray(FRAME.size)
    recv_exact(sock, memoryview(head))
    kind, size = FRAME.unpack(head)
    if size > MAX_BODY_BYTES:
        raise ConnectionError(f"a frame body of {size} bytes (at most {MAX_BODY_BYTES})")
    body = bytearray(size)
    recv_exact(sock, memoryview(body))
    return kind, bytes(body)


def frame(kind: int, body: bytes) -> bytes:
    return FRAME.pack(kind, len(body)) + body


def tune(sock: socket.socket) -> None:
    """Small frames go out at once; bulk frames get buffers of a few MiB."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
        except OSError:  # pragma: no cover - capped by the kernel; the default then
            pass


def _load_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl loads a certificate chain only from files: a private temporary directory."""
    with tempfile.TemporaryDirectory(prefix="shardps-tls-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        context.load_cert_chain(cert_path, key_path)


def server_context(security: rpc.Security) -> ssl.SSLContext | None:
    """TLS for a data-plane listener, as rpc.bind does for gRPC (None: plain TCP)."""
    if not (security.cert and security.key):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, security.cert, security.key)
    if security.ca:
        context.load_verify_locations(cadata=security.ca.decode())
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(security: rpc.Security) -> ssl.SSLContext | None:
    """TLS for data-plane connections, as rpc.make_channel does for gRPC (None: plain TCP)."""
    if not security.tls:
        return None
    context = ssl.create_default_context(cadata=security.ca.decode() if security.ca else None)
    if security.cert and security.key:
        _load_chain(context, security.cert, security.key)
    return context


class Connection:
    """One client connection to a server's data plane; used by one thread at a time.

    Every call sends one request and reads its reply. Any failure closes the connection
    (`closed` turns true) and raises DataPlaneError: UNAVAILABLE or DEADLINE_EXCEEDED for
    transport trouble, the server's code for a refusal.
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, token: str | None):
        self.address = f"{host}:{port}"
        self._sock: socket.socket | None = None
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE,
                                 f"data plane {self.address}: {exc}") from None
        try:
            tune(sock)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
            self._sock = sock
            hello = (token or "").encode()
            sock.sendall(MAGIC + TOKEN_LEN.pack(len(hello)) + hello)
            self._reply(CONNECT_TIMEOUT_S)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            self._sock = None
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE,
                                 f"data plane {self.address}: {exc}") from None
        except DataPlaneError:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self._sock is None

    def usable(self) -> bool:
        """Whether an idle connection can take a request: false (and closed) once the server
        has closed it (it closes connections idle for long) or sent something unasked."""
        sock = self._sock
        if sock is None:
            return False
        try:
            readable = bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            readable = True
        if readable:
            self.close()
        return not readable

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def pull(self, request: ps_pb2.PullRequest, dest: torch.Tensor,
             timeout: float) -> ps_pb2.PullResponse:
        """Sends the pull; a ready reply's elements land in `dest` (flat, CPU, its length)."""
        self.start_pull(request, timeout)
        return self.finish_pull(request, dest, timeout)

    # The halves, so that a caller can send to several servers before it reads any reply
    # (PSClient pushes this way; start_push sends `part`, flat and on the CPU, in the wire
    # dtype under `header`).

    def start_push(self, header: ps_pb2.PushHeader, part: torch.Tensor, wire_dtype: int,
                   timeout: float) -> None:
        def send(sock: socket.socket) -> None:
            sock.sendall(frame(PUSH, header.SerializeToString()))
            for piece in _wire_pieces(part, codec.torch_dtype(wire_dtype)):
                sock.sendall(piece)

        self._send(send, timeout)

    def finish_push(self, timeout: float) -> ps_pb2.PushResponse:
        return ps_pb2.PushResponse.FromString(self._reply(timeout))

    def start_pull(self, request: ps_pb2.PullRequest, timeout: float) -> None:
        self._send(lambda sock: sock.sendall(frame(PULL, request.SerializeToString())), timeout)

    def finish_pull(self, request: ps_pb2.PullRequest, dest: torch.Tensor,
                    timeout: float) -> ps_pb2.PullResponse:
        head = ps_pb2.PullResponse.FromString(self._reply(timeout))
        if head.ready:
            if head.length != dest.numel():
                self.close()  # its elements are on the way: this connection is out of step
                raise DataPlaneError(grpc.StatusCode.INTERNAL, f"data plane {self.address}: "
                                     f"{head.length} elements, expected {dest.numel()}")
            self._guard(lambda sock: _recv_into(sock, dest, codec.torch_dtype(request.dtype)))
        return head

    def _send(self, send, timeout: float) -> None:
        def timed(sock: socket.socket) -> None:
            sock.settimeout(timeout)
            send(sock)

        self._guard(timed)

    def _reply(self, timeout: float) -> bytes:
        def timed(sock: socket.socket) -> tuple[int, bytes]:
            sock.settimeout(timeout)
            return recv_frame(sock)

        code, body = self._guard(timed)
        if code:
            self.close()  # the server closes after most refusals; never guess which
            raise DataPlaneError(status_code(code), body.decode("utf-8", "replace"))
        return body

    def _guard(self, fn):
        sock = self._sock
        if sock is None:
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"data plane {self.address}: closed")
        try:
            return fn(sock)
        except TimeoutError:
            self.close()
            raise DataPlaneError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"data plane {self.address}: timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE,
                                 f"data plane {self.address}: {exc}") from None


def _wire_pieces(part: torch.Tensor, dtype: torch.dtype):
    """Byte views of `part` in `dtype`: the tensor itself when it already is (no copy), else
    casts of IO_BYTES at a time into one reused buffer."""
    part = part.detach()
    if part.dtype == dtype:
        yield as_bytes(part.contiguous())
        return
    step = max(1, IO_BYTES // dtype.itemsize)
    scratch = torch.empty(min(step, part.numel()), dtype=dtype)
    for lo in range(0, part.numel(), step):
        piece = part[lo : lo + step]
        yield as_bytes(scratch[: piece.numel()].copy_(piece))


def _recv_into(sock: socket.socket, dest: torch.Tensor, dtype: torch.dtype) -> None:
    """Receives dest.numel() elements of `dtype` into dest (straight in when dtypes match)."""
    if dest.dtype == dtype:
        recv_exact(sock, as_bytes(dest))
        return
    step = max(1, IO_BYTES // dtype.itemsize)
    scratch = torch.empty(min(step, dest.numel()), dtype=dtype)
    for lo in range(0, dest.numel(), step):
        piece = dest[lo : lo + step]
        recv_exact(sock, as_bytes(scratch[: piece.numel()]))
        piece.copy_(scratch[: piece.numel()])
