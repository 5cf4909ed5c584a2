"""The data plane's wire format: Push and Pull as raw frames over TCP, beside the gRPC service.

This module is the format and the frame reading and writing both ends share; the client
connection is shardps.psclient.connection, the listener shardps.server.ps.dataserver, and the
TLS contexts shardps.runtime.sslcontext.

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
           a push then sends exactly header.length elements in header.dtype, or, when
           compressed, header.compressed_bytes bytes of its encoding (proto/compress.py);
           with header.pieces > 0 (an overlapped push) the elements come as that many
           pieces, each a PIECE head (u64 offset, u64 count, in elements) and then count
           elements, covering [0, length) exactly once in any order
  reply    u8 code (the number of a grpc.StatusCode, 0 = OK), u32 n, n bytes: the
           PushResponse or PullResponse (code 0) or a UTF-8 message (any other code); a
           ready pull's reply is followed by its `length` elements in the requested dtype

  rows     the embedding tables' calls (ps.proto's InitRows, PullRows, PushRows):
           request u8 kind (INIT_ROWS, PULL_ROWS or PUSH_ROWS), u32 n, n bytes of the RPC's
           request message; reply as above, its body the RPC's response message. Ids and
           rows are the messages' bytes fields (proto/rowcodec.py: int64 ids, fp32 rows,
           little-endian). Either body may be up to MAX_ROWS_BODY_BYTES, gRPC's message limit,
           so a call that fits one path fits the other.

  shared memory (the same-host path, runtime/shm.py): a server offers it only on a
           connection between two loopback addresses (`--shared-memory off`: never). Requests:
           SHM_OPEN     u64 capacity in bytes; reply body: 16 bytes of nonce and the
                        segment's path (UTF-8), or empty: declined (not offered on this
                        connection, larger than any shard, no space in /dev/shm)
           SHM_CONFIRM  u8 1 if the client mapped the segment and found the nonce, else 0;
                        reply empty. The server unlinks the file at this request (or when
                        the connection ends) and keeps the segment only on a 1
           PUSH_SHM     as PUSH, uncompressed only, but the elements are in the segment at
                        their offsets ([0, length) in the wire dtype) before the frame is
                        sent; with header.pieces the PIECE heads still come on the socket,
                        each sent once its elements are in the segment
           PULL_SHM     as PULL, uncompressed only; a ready reply's head is followed by
                        LANDED frames (u64 elements written so far, rising to `length`),
                        each sent once those elements are in the segment; or, where the
                        connection has no segment that holds them, by one LANDED frame of
                        ON_SOCKET and then the elements on the socket as for PULL
           A newer SHM_OPEN replaces the connection's segment. The segment belongs to the
           one request in flight on its connection: the client does not touch it between
           sending a request and reading its reply, except to write a push's pieces ahead
           of their heads.

With TLS configured (the process's Security) the socket is TLS with the process's certificates and CA,
as its gRPC channels and servers are; the token is checked at hello. Every blocking socket
call has a timeout; a connection that fails mid-frame is closed, never reused.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import grpc
import torch

PROTOCOL = 1
MAGIC = b"SPSDATA1"
PUSH, PULL = 1, 2
INIT_ROWS, PULL_ROWS, PUSH_ROWS = 3, 4, 5  # the row calls: a request message per frame
ROW_KINDS = frozenset({INIT_ROWS, PULL_ROWS, PUSH_ROWS})
SHM_OPEN, SHM_CONFIRM, PUSH_SHM, PULL_SHM = 6, 7, 8, 9  # the same-host path
CAPACITY = struct.Struct("<Q")   # SHM_OPEN's body
LANDED = struct.Struct("<Q")     # PULL_SHM's progress: elements in the segment so far
ON_SOCKET = (1 << 64) - 1        # a LANDED value: the elements come on the socket instead
FRAME = struct.Struct("<BI")  # kind or code, body length
PIECE = struct.Struct("<QQ")  # an overlapped push's piece: offset, count (elements)
MAX_PIECES = 1 << 16          # pieces one push may come in
TOKEN_LEN = struct.Struct("<I")
MAX_BODY_BYTES = 64 * 1024       # headers, replies and error messages are small
MAX_ROWS_BODY_BYTES = 32 * 1024 * 1024  # a row call's request or reply (runtime/rpc.py's limit)
MAX_TOKEN_BYTES = 4096
IO_BYTES = 4 * 1024 * 1024       # bytes per recv_into / per cast slice
# A compressed body (a push's, a pull delta's) is received this many bytes at a time, what
# has landed decoded between receives (1 MiB: 8M elements of sign, ~7 ms of decoding).
LANDING_BYTES = 1024 * 1024
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


def recv_decoding(read: Callable[[memoryview], None], size: int,
                  decode: Callable[[memoryview, int, int], int]) -> None:
    """Reads a body of `size` bytes with read(view) (fills view or raises) LANDING_BYTES at a
    time; after each piece, done = decode(body, landed, done) decodes what has landed, so the
    decode hides behind the receipt. An exception from decode stops the decoding, not the
    reading (the connection stays in step), and is raised once the whole body is in."""
    body = memoryview(bytearray(size))
    landed = done = 0
    error: Exception | None = None
    while landed < size:
        n = min(LANDING_BYTES, size - landed)
        read(body[landed : landed + n])
        landed += n
        if error is None:
            try:
                done = decode(body, landed, done)
            except Exception as exc:  # raised below, once the whole body is read
                error = exc
    if error is not None:
        raise error


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


def recv_frame(sock: socket.socket, limit: int = MAX_BODY_BYTES) -> tuple[int, bytes]:
    """One frame head and body; raises ConnectionError if the body is over `limit` bytes."""
    head = bytearray(FRAME.size)
    recv_exact(sock, memoryview(head))
    kind, size = FRAME.unpack(head)
    if size > limit:
        raise ConnectionError(f"a frame body of {size} bytes (at most {limit})")
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
