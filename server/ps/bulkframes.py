"""The data plane's Push and Pull frames on the server (proto/dataplane.py), through BulkOps:
a pushed gradient received straight into the shard's staging buffer (checked for NaN/inf a few
MiB at a time, while in cache), a pulled snapshot copied a few MiB at a time under the shard's
lock into a buffer sent outside it; on the same-host path (PUSH_SHM, PULL_SHM) the elements
move through the connection's shared-memory segment (shmserve.py) instead of the socket.
dataserver.py reads the frames and owns the connections.

A push refused before its elements were read has them drained when its header declares a
sane size (the connection stays in step), else the connection is closed after the reply.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import grpc
import torch
from google.protobuf.message import DecodeError

from shardps.proto import codec, dataplane, ps_pb2
from shardps.runtime import shm

from . import compressed, forwarding, pieces, rowframes, shmserve
from .bulk import BulkOps, PullPlan, Refused
from .forwarding import OnPiece
from .shmserve import ShmError, ShmLink

MAX_DRAIN_BYTES = 1 << 36  # a push header declaring more is not read on; the connection closes


class CloseConnection(Exception):
    """Ends a connection (after whatever reply was due has been sent)."""


class BulkFrames:
    """Answers one Push or Pull frame on a connection's thread. `is_active()` turns false
    when the server stops (a pull's wait then ends). Thread-safe: BulkOps is."""

    def __init__(self, bulk: BulkOps, is_active: Callable[[], bool]):
        self.bulk = bulk
        self.is_active = is_active

    def push(self, conn: socket.socket, body: bytes, deadline: dataplane.Deadline,
             link: ShmLink | None = None) -> None:
        """PUSH, or PUSH_SHM with `link`: the elements from the segment, not the socket."""
        try:
            header = ps_pb2.PushHeader.FromString(body)
        except DecodeError:
            self.bulk.metrics.rejected.labels("bad_header").inc()
            reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, "push header does not parse", deadline)
            raise CloseConnection("bad push header") from None
        segment = None if link is None else _segment_for(link, header)
        declared = (compressed.body_bytes(header) if segment is None
                    else header.pieces * dataplane.PIECE.size)  # only the piece heads come
        consumed = False

        def fill(grad: torch.Tensor, on_piece: OnPiece | None) -> tuple[int, bool]:
            nonlocal consumed
            consumed = True
            if compressed.is_compressed(header):  # bytes bounded by bulk.push's check_header
                return compressed.receive_into(header, lambda view: dataplane.recv_exact(conn, view, deadline),
                                               grad)
            take = (pieces.receiver(conn, grad, deadline) if segment is None
                    else shmserve.reader(segment, grad))
            if header.pieces:  # an overlapped push: pieces in any order
                return pieces.fill(conn, header, grad, deadline, on_piece, take, segment is None)
            finite = True
            step = (dataplane.IO_BYTES if on_piece is None else forwarding.PIECE_BYTES) // grad.element_size()
            for lo in range(0, grad.numel(), step):
                hi = min(lo + step, grad.numel())
                take(lo, hi)
                if finite:  # each piece while it is in cache
                    finite = codec.pushable(grad[lo:hi])
                if on_piece is not None and finite:  # on to the backups (cut-through)
                    on_piece(lo, hi)
            return grad.numel() * grad.element_size(), finite

        try:
            reply: ps_pb2.PushResponse | Refused = self.bulk.push(header, fill)
        except Refused as exc:
            reply = exc
        # The elements not read yet are drained, so the connection stays in step; a size
        # that cannot be trusted closes it after the reply instead.
        in_step = consumed or self._drain(conn, declared, deadline)
        if segment is not None and consumed:
            self.bulk.metrics.shm_bytes.labels("push").inc(header.length * codec.element_size(header.dtype))
        if isinstance(reply, Refused):
            reply_error(conn, reply.code, str(reply), deadline)
        elif self.bulk.faults.drop(reply):
            raise CloseConnection("fault injected: push reply dropped")
        else:
            dataplane.send_all(conn, dataplane.frame(0, reply.SerializeToString()), deadline)
        if not in_step:
            raise CloseConnection(f"push declares {declared} bytes")

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

    def pull(self, conn: socket.socket, body: bytes, scratch: dict[torch.dtype, torch.Tensor],
             deadline: dataplane.Deadline, link: ShmLink | None = None) -> None:
        """PULL, or PULL_SHM with `link`: the elements into the segment, not the socket."""
        try:
            request = ps_pb2.PullRequest.FromString(body)
        except DecodeError:
            reply_error(conn, grpc.StatusCode.INVALID_ARGUMENT, "pull request does not parse", deadline)
            raise CloseConnection("bad pull request") from None
        if link is not None and request.compress:
            raise ShmError(grpc.StatusCode.INVALID_ARGUMENT, "a compressed pull comes on the socket")
        try:
            plan = self.bulk.pull(request, self.is_active)
        except Refused as exc:
            reply_error(conn, exc.code, str(exc), deadline)
            return
        sent = 0
        try:
            dataplane.send_all(conn, dataplane.frame(0, plan.head.SerializeToString()), deadline)
            if plan.snapshot is None:
                return
            if link is not None:  # into the segment, or (too small) ON_SOCKET and as PULL
                segment = link.fitting(plan.shard.length, plan.dtype)
                if segment is not None:
                    sent = self._pull_into(conn, plan, segment, deadline)
                    return
                dataplane.send_all(conn, dataplane.LANDED.pack(dataplane.ON_SOCKET), deadline)
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

    def _pull_into(self, conn: socket.socket, plan: PullPlan, segment: shm.Segment,
                   deadline: dataplane.Deadline) -> int:
        """A ready PULL_SHM's elements, copied (and cast) under the shard's lock straight into
        the segment a few MiB at a time, each followed by a LANDED frame; returns bytes."""
        step = max(1, dataplane.IO_BYTES // plan.dtype.itemsize)

        def copy(lo: int, view: torch.Tensor) -> int:
            segment.tensor(plan.dtype, view.numel(), lo).copy_(view)
            return lo + view.numel()

        for landed in self.bulk.pieces(plan, step, copy):
            dataplane.send_all(conn, dataplane.LANDED.pack(landed), deadline)
        self.bulk.metrics.shm_bytes.labels("pull").inc(plan.shard.length * plan.dtype.itemsize)
        return plan.shard.length * plan.dtype.itemsize


def _segment_for(link: ShmLink, header: ps_pb2.PushHeader) -> shm.Segment:
    """The segment a PUSH_SHM's elements are in (ShmError if they are not there)."""
    if compressed.is_compressed(header):
        raise ShmError(grpc.StatusCode.INVALID_ARGUMENT, "a compressed push comes on the socket")
    try:
        dtype = codec.torch_dtype(header.dtype)
    except codec.CodecError as exc:
        raise ShmError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    return link.require(header.length, dtype)


def reply_error(conn: socket.socket, code: grpc.StatusCode, message: str,
                deadline: dataplane.Deadline) -> None:
    dataplane.send_all(conn, rowframes.error_frame(code, message), deadline)
