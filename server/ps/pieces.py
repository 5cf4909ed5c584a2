"""Overlapped pushes on the server (PushHeader.pieces, docs/network.md "Overlap"): a
gradient that arrives as pieces in any order, each a PIECE head and its elements, received
straight into the shard's staging buffer. The push is handled only once every piece is in,
so the shard sees exactly what an in-order push would have given it.

The data plane's only: the Push RPC's chunks carry offsets of their own. On the same-host path
(PUSH_SHM) the heads come on the socket and each piece's elements are in the shared segment.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch

from shardps.proto import codec, dataplane, ps_pb2

from .errors import InvalidPushError
from .forwarding import OnPiece

REASON = "bad_pieces"


def check_header(header: ps_pb2.PushHeader, compressed: bool) -> None:
    """Raises InvalidPushError unless `pieces` is one to read on: uncompressed, at most one
    piece per element and at most dataplane.MAX_PIECES."""
    if not header.pieces:
        return
    if compressed:
        raise InvalidPushError("pieces: a compressed push comes whole", REASON)
    if header.pieces > min(max(header.length, 0), dataplane.MAX_PIECES):
        raise InvalidPushError(f"pieces {header.pieces} is outside [1, "
                               f"{min(max(header.length, 0), dataplane.MAX_PIECES)}] for "
                               f"{header.length} elements", REASON)


Take = Callable[[int, int], None]  # take(lo, hi): elements [lo, hi) of the push into grad


def receiver(conn: socket.socket, grad: torch.Tensor, deadline: dataplane.Deadline) -> Take:
    """take(lo, hi) reading the elements from the socket (they come in the order taken)."""
    data, size = dataplane.as_bytes(grad), grad.element_size()

    def take(lo: int, hi: int) -> None:
        dataplane.recv_exact(conn, data[lo * size : hi * size], deadline)
    return take


def fill(conn: socket.socket, header: ps_pb2.PushHeader, grad: torch.Tensor,
         deadline: dataplane.Deadline, on_piece: OnPiece | None = None,
         take: Take | None = None, on_socket: bool = True) -> tuple[int, bool]:
    """Receives every piece into `grad` (the staging buffer, header.length elements of the
    wire dtype); returns (element bytes received, whether all are codec.pushable).
    `on_piece`, if given, hears of each piece once it is in and pushable. `take` moves a
    piece's elements in (default: `receiver`); `on_socket` says whether they come on the
    socket, to be drained there after a bad head.

    Reads exactly the bytes the header declares, also when a piece head is bad (the rest
    is drained, so the connection stays in step), then raises codec.CodecError for heads
    that run past the end or do not cover [0, length) exactly once.
    """
    take = take or receiver(conn, grad, deadline)
    size = grad.element_size()
    head = bytearray(dataplane.PIECE.size)
    spans: list[tuple[int, int]] = []
    error: str | None = None
    finite = True
    received = 0  # elements read so far
    for left in range(header.pieces, 0, -1):
        dataplane.recv_exact(conn, memoryview(head), deadline)
        offset, count = dataplane.PIECE.unpack(head)
        # Past the end, or more elements than the shard has: never read beyond the header's
        # length (what is left of it is drained).
        if count == 0 or offset + count > grad.numel() or received + count > grad.numel():
            error = f"piece [{offset}, {offset + count}) of {grad.numel()} elements"
            _drain(conn, (grad.numel() - received) * size * on_socket
                   + (left - 1) * dataplane.PIECE.size, deadline)
            break
        per_io = max(1, dataplane.IO_BYTES // size)
        for lo in range(offset, offset + count, per_io):
            hi = min(lo + per_io, offset + count)
            take(lo, hi)
            if finite:  # each few MiB while it is in cache, as an in-order push is checked
                finite = codec.pushable(grad[lo:hi])
        spans.append((offset, count))
        received += count
        if on_piece is not None and finite:
            on_piece(offset, offset + count)
    if error is None:
        error = _coverage_error(spans, grad.numel())
    if error is not None:
        raise codec.CodecError(f"pushed pieces: {error}")
    return grad.numel() * size, finite


def _drain(conn: socket.socket, nbytes: int, deadline: dataplane.Deadline) -> None:
    sink = bytearray(min(max(nbytes, 0), dataplane.IO_BYTES) or 1)
    view = memoryview(sink)
    while nbytes > 0:
        n = min(nbytes, len(sink))
        dataplane.recv_exact(conn, view[:n], deadline)
        nbytes -= n


def _coverage_error(spans: list[tuple[int, int]], length: int) -> str | None:
    """Why the pieces do not cover [0, length) exactly once; None when they do."""
    at = 0
    for offset, count in sorted(spans):
        if offset != at:
            return (f"overlap at element {offset}" if offset < at
                    else f"elements [{at}, {offset}) missing")
        at = offset + count
    return None if at == length else f"elements [{at}, {length}) missing"
