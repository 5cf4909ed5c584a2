"""A worker's (or client's) connection to one server's data plane (wire format:
shardps.proto.dataplane)."""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import torch

from shardps.proto import codec, ps_pb2
from shardps.proto.dataplane import (
    CONNECT_TIMEOUT_S,
    IO_BYTES,
    MAGIC,
    MAX_BODY_BYTES,
    PIECE,
    PULL,
    PULL_SHM,
    PUSH,
    PUSH_SHM,
    TOKEN_LEN,
    DataPlaneError,
    as_bytes,
    frame,
    recv_exact,
    recv_frame,
    status_code,
    tune,
)
from shardps.psclient import deltas
from shardps.psclient.shmlink import ClientShm, Lengths, land, loopback
from shardps.psclient.transport import PullWatch
from shardps.runtime import shm

_T = TypeVar("_T")


class Connection:
    """One client connection to a server's data plane; used by one thread at a time.

    Every call sends one request and reads its reply. Any failure closes the connection
    (`closed` turns true) and raises DataPlaneError: UNAVAILABLE or DEADLINE_EXCEEDED for
    transport trouble, the server's code for a refusal.

    Where the server offers shared memory (on loopback, psclient/shmlink.py),
    dense pushes and pulls move their elements through the connection's segment; `lengths`
    (shared by a server's connections) remembers each shard's length, to size the segment
    before a pull's reply says it.
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, token: str | None,
                 lengths: Lengths | None = None):
        self.address = f"{host}:{port}"
        self._sock: socket.socket | None = None
        self._shm: ClientShm | None = None
        self._lengths: Lengths = {} if lengths is None else lengths
        self._pieces: shm.Segment | None = None  # the segment of the push whose pieces go out
        self._pulling: shm.Segment | None = None  # the segment of the pull sent last
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
            if loopback(sock):  # the server may offer shared memory: asked when first needed
                self._shm = ClientShm(self._exchange)
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
        self._pieces = self._pulling = None
        if self._shm is not None:
            self._shm.close()
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

    def start_push(self, header: ps_pb2.PushHeader, part: torch.Tensor | bytes, wire_dtype: int,
                   timeout: float) -> None:
        """Sends the header and then `part`: elements in the wire dtype, or a compressed
        push's encoding (bytes, header.compressed_bytes long) as it is."""
        self._lengths[header.job_id, header.shard_index] = header.length
        dtype = codec.torch_dtype(wire_dtype)
        if not isinstance(part, bytes):  # elements into the segment, the header on the socket
            segment = self._segment(part.numel(), dtype, timeout)
            if segment is not None:
                segment.tensor(dtype, part.numel()).copy_(part.detach())
                self._send(lambda sock: sock.sendall(frame(PUSH_SHM, header.SerializeToString())),
                           timeout)
                return

        def send(sock: socket.socket) -> None:
            sock.sendall(frame(PUSH, header.SerializeToString()))
            if isinstance(part, bytes):
                sock.sendall(part)
                return
            for piece in _wire_pieces(part, dtype):
                sock.sendall(piece)

        self._send(send, timeout)

    def start_pieces(self, header: ps_pb2.PushHeader, timeout: float) -> None:
        """Sends an overlapped push's header (header.pieces > 0); its pieces follow, one
        `send_piece` each, then `finish_push`."""
        self._lengths[header.job_id, header.shard_index] = header.length
        self._pieces = self._segment(header.length, codec.torch_dtype(header.dtype), timeout)
        kind = PUSH if self._pieces is None else PUSH_SHM
        self._send(lambda sock: sock.sendall(frame(kind, header.SerializeToString())), timeout)

    def send_piece(self, offset: int, part: torch.Tensor, wire_dtype: int,
                   timeout: float) -> None:
        """Sends one piece of an overlapped push: its head, then `part`'s elements in the wire
        dtype (`offset`: where `part` starts in the shard, in elements)."""
        segment, dtype = self._pieces, codec.torch_dtype(wire_dtype)
        # Its elements in place first, then its head (one past the end: the head alone, for
        # the server to refuse as on the socket).
        if segment is not None and shm.fits(segment.capacity, part.numel(), dtype, offset):
            segment.tensor(dtype, part.numel(), offset).copy_(part.detach())

        def send(sock: socket.socket) -> None:
            sock.sendall(PIECE.pack(offset, part.numel()))
            for piece in [] if segment is not None else _wire_pieces(part, dtype):
                sock.sendall(piece)

        self._send(send, timeout)

    def finish_push(self, timeout: float) -> ps_pb2.PushResponse:
        return ps_pb2.PushResponse.FromString(self._reply(timeout))

    def start_pull(self, request: ps_pb2.PullRequest, timeout: float, behind: bool = False) -> None:
        """Sends a pull; `behind` a push whose reply is still to come (the segment is then
        used as it is, never grown: that would take an exchange of its own)."""
        self._pulling = None
        if not request.compress and self._shm is not None:  # a segment that holds it, if any
            length = self._lengths.get((request.job_id, request.shard_index), 0)
            self._pulling = (self._segment(length, codec.torch_dtype(request.dtype), timeout)
                             if length and not behind else self._shm.segment)
        kind = PULL if self._pulling is None else PULL_SHM
        self._send(lambda sock: sock.sendall(frame(kind, request.SerializeToString())), timeout)

    def finish_pull(self, request: ps_pb2.PullRequest, dest: torch.Tensor,
                    timeout: float, watch: PullWatch | None = None) -> ps_pb2.PullResponse:
        """Reads a pull's reply into `dest`; `watch` hears of the head and of every few MiB of
        a dense reply's elements as they land (a compressed one's all at once, at the end)."""
        head = ps_pb2.PullResponse.FromString(self._reply(timeout))
        segment, self._pulling = self._pulling, None
        if head.ready:
            self._lengths[request.job_id, request.shard_index] = head.length
            if head.length != dest.numel():
                self.close()  # its elements are on the way: this connection is out of step
                raise DataPlaneError(grpc.StatusCode.INTERNAL, f"data plane {self.address}: "
                                     f"{head.length} elements, expected {dest.numel()}")
            if head.delta_compression:  # a compressed pull: an encoding to add to dest
                try:
                    size = deltas.delta_bytes(head)
                except codec.CodecError:
                    self.close()  # a body of a size not to read on: out of step
                    raise
                self._guard(lambda sock: deltas.receive_delta(lambda view: recv_exact(sock, view), size, dest))
                return head
            if watch is not None:
                watch.head(head)
            dtype = codec.torch_dtype(request.dtype)
            if segment is not None and self._landed(segment, dest, dtype, watch):
                return head
            self._guard(lambda sock: _recv_into(sock, dest, dtype, watch))
        return head

    def _landed(self, segment: shm.Segment, dest: torch.Tensor, dtype: torch.dtype,
                watch: PullWatch | None) -> bool:
        """A PULL_SHM's elements from the segment; False if they come on the socket."""
        try:
            return self._guard(lambda sock: land(sock, segment, dest, dtype, self.address, watch))
        except DataPlaneError:
            self.close()  # out of step
            raise

    def _segment(self, count: int, dtype: torch.dtype, timeout: float) -> shm.Segment | None:
        """This connection's segment grown to hold `count` elements of `dtype`, or None."""
        if self._shm is None:
            return None
        return self._shm.ensure(count * dtype.itemsize, timeout)

    def _exchange(self, kind: int, body: bytes, timeout: float) -> bytes:
        self._send(lambda sock: sock.sendall(frame(kind, body)), timeout)
        return self._reply(timeout)

    def start_request(self, kind: int, body: bytes, timeout: float) -> None:
        """Sends one request frame whose body is all of it (the row calls: a message)."""
        self._send(lambda sock: sock.sendall(frame(kind, body)), timeout)

    def finish_request(self, timeout: float, limit: int) -> bytes:
        """The body of the reply to start_request, of at most `limit` bytes."""
        return self._reply(timeout, limit)

    def _send(self, send: Callable[[socket.socket], None], timeout: float) -> None:
        def timed(sock: socket.socket) -> None:
            sock.settimeout(timeout)
            send(sock)

        self._guard(timed)

    def _reply(self, timeout: float, limit: int = MAX_BODY_BYTES) -> bytes:
        def timed(sock: socket.socket) -> tuple[int, bytes]:
            sock.settimeout(timeout)
            return recv_frame(sock, limit)

        code, body = self._guard(timed)
        if code:
            self.close()  # the server closes after most refusals; never guess which
            raise DataPlaneError(status_code(code), body.decode("utf-8", "replace"))
        return body

    def _guard(self, fn: Callable[[socket.socket], _T]) -> _T:
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


def _wire_pieces(part: torch.Tensor, dtype: torch.dtype) -> Iterator[memoryview]:
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


def _recv_into(sock: socket.socket, dest: torch.Tensor, dtype: torch.dtype,
               watch: PullWatch | None = None) -> None:
    """Receives dest.numel() elements of `dtype` into dest (straight in when dtypes match),
    telling `watch` after each IO_BYTES."""
    step = max(1, IO_BYTES // dtype.itemsize)
    if dest.dtype == dtype:
        if watch is None:
            recv_exact(sock, as_bytes(dest))
            return
        for lo in range(0, dest.numel(), step):
            recv_exact(sock, as_bytes(dest[lo : lo + step]))
            watch.received(min(lo + step, dest.numel()))
        return
    scratch = torch.empty(min(step, dest.numel()), dtype=dtype)
    for lo in range(0, dest.numel(), step):
        piece = dest[lo : lo + step]
        recv_exact(sock, as_bytes(scratch[: piece.numel()]))
        piece.copy_(scratch[: piece.numel()])
        if watch is not None:
            watch.received(lo + piece.numel())
