"""OverlappedPush: a dense push whose buckets leave while backward still runs (docs/network.md,
"Overlap").

Each shard gets one push on its data plane, announced with its number of pieces
(PushHeader.pieces) before backward starts; a bucket (a range of the flat gradient) is queued
when autograd has finished it (`ready`), and one sender thread per shard sends the queued
pieces lowest offset first: the first layers, which the next forward needs first, go before
later ones that are already waiting. The server handles the push once every piece is in, so
what it applies is what a whole push would have given it. A shard without a data plane gets
an ordinary push at `finish`.

Threading: `ready` may be called from any thread (autograd's); `finish` and `cancel` from the
owner's. The sender threads only read the gradient ranges that `ready` named.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.proto.dataplane import DataPlaneError
from shardps.psclient.plane import DataPlaneTransport, PlanePieces
from shardps.psclient.transport import PendingPull, Transport
from shardps.runtime import rpc

# How often a sender thread waiting for a bucket looks at whether the push was abandoned.
_POLL_S = 1.0


@dataclass
class Lane:
    """One shard's part of an overlapped push.

    Attributes:
        shard: the shard's range of the flat vector.
        header: its push header (pieces filled in where `pieces` is set).
        transport: the server's transport (for a whole push when `pieces` is None).
        then_pull: the pull to send behind the push, or None.
        pieces: the open data-plane push, or None (sent whole at `finish`).
        queue: pieces ready and not yet sent, a heap of (offset in the shard, count,
            monotonic time it became ready): the lowest offset goes first.
        sent, total: pieces sent so far, and in all.
        error: what stopped the sender thread, for `finish` to raise.
        thread: the sender thread (None for a whole push).
    """

    shard: common_pb2.ShardRange
    header: ps_pb2.PushHeader
    transport: Transport
    then_pull: ps_pb2.PullRequest | None
    pieces: PlanePieces | None = None
    queue: list[tuple[int, int, float]] = field(default_factory=list)
    sent: int = 0
    total: int = 0
    error: BaseException | None = None
    thread: threading.Thread | None = None


def split(buckets: Sequence[tuple[int, int]],
          shards: Sequence[common_pb2.ShardRange]) -> list[list[tuple[int, int, int]]]:
    """For each bucket (a flat range [lo, hi)), its pieces as (shard position, offset in the
    shard, count). Buckets must cover the flat vector; a bucket across a shard boundary is
    one piece per shard."""
    out: list[list[tuple[int, int, int]]] = []
    for lo, hi in buckets:
        parts = []
        for i, shard in enumerate(shards):
            a, b = max(lo, shard.offset), min(hi, shard.offset + shard.length)
            if a < b:
                parts.append((i, a - shard.offset, b - a))
        out.append(parts)
    return out


class OverlappedPush:
    """A push in flight whose buckets are sent as they become ready (module docstring)."""

    def __init__(self, grad: torch.Tensor, lanes: list[Lane],
                 buckets: Sequence[tuple[int, int]],
                 on_done: Callable[[list[PendingPull | None]], None],
                 on_wait: Callable[[float], None] | None = None):
        """`grad`: the flat gradient the buckets are ranges of (read by the sender threads
        once a bucket is ready); `on_done(pulls)` gets the pulls sent behind the pushes
        (by `finish`); `on_wait(seconds)` hears how long each piece waited to be sent."""
        self._grad, self._lanes = grad, lanes
        self._pieces = split(buckets, [lane.shard for lane in lanes])
        self._readied = [False] * len(buckets)
        self._on_done, self._on_wait = on_done, on_wait
        self._cond = threading.Condition()
        self._stopped = False
        self.early = 0  # pieces sent before `backward_done` (or `finish`) was called
        self._after = False
        for parts in self._pieces:
            for i, _, _ in parts:
                lanes[i].total += 1
        try:
            for lane in lanes:
                if isinstance(lane.transport, DataPlaneTransport):
                    lane.header.pieces = lane.total
                    lane.pieces = lane.transport.start_pieces(lane.header, lane.then_pull)
                    lane.thread = threading.Thread(target=self._send_loop, args=(lane,),
                                                   name="push-pieces", daemon=True)
                    lane.thread.start()
        except BaseException:
            self.cancel()
            raise

    @property
    def buckets(self) -> int:
        return len(self._readied)

    @property
    def pieces(self) -> int:
        """Pieces of the push, over every shard (whole pushes not counted)."""
        return sum(lane.total for lane in self._lanes if lane.thread is not None)

    def backward_done(self) -> None:
        """Marks the end of backward: pieces sent from now on do not count as `early`."""
        with self._cond:
            self._after = True

    def ready(self, bucket: int) -> None:
        """Bucket `bucket`'s gradient is final: queue its pieces (again: no-op)."""
        now = time.monotonic()
        with self._cond:
            if self._readied[bucket] or self._stopped:
                return
            self._readied[bucket] = True
            for i, offset, count in self._pieces[bucket]:
                heapq.heappush(self._lanes[i].queue, (offset, count, now))
            self._cond.notify_all()

    def finish(self) -> list[ps_pb2.PushResponse]:
        """Queues every bucket not yet ready (parameters that got no gradient), waits for the
        senders, and reads each server's reply in shard order. Raises grpc.RpcError (the
        push may then be sent again whole: pushes are idempotent)."""
        self.backward_done()
        for bucket in range(self.buckets):
            self.ready(bucket)
        deadline = time.monotonic() + rpc.TRANSFER_DEADLINE_S
        try:
            for lane in self._lanes:
                if lane.thread is not None:
                    lane.thread.join(max(0.0, deadline - time.monotonic()))
                    if lane.thread.is_alive():
                        raise DataPlaneError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                             "an overlapped push's sender did not finish")
                if lane.error is not None:
                    raise lane.error
            replies: list[ps_pb2.PushResponse] = []
            pulls: list[PendingPull | None] = []
            for lane in self._lanes:
                pull: PendingPull | None
                if lane.pieces is not None:
                    reply, pull = lane.pieces.finish()
                else:
                    part = self._grad[lane.shard.offset : lane.shard.offset + lane.shard.length]
                    reply, pull = lane.transport.start_push(lane.header, part,
                                                            lane.then_pull).finish()
                lane.pieces = None  # read: nothing left to cancel
                replies.append(reply)
                pulls.append(pull)
        except BaseException:
            self.cancel()
            raise
        self._on_done(pulls)
        return replies

    def cancel(self) -> None:
        """Abandons the push: the senders stop, the connections close (the servers discard
        what they received)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for lane in self._lanes:
            if lane.pieces is not None:
                lane.pieces.cancel()
                lane.pieces = None

    def _send_loop(self, lane: Lane) -> None:
        """Sends lane's pieces as they are queued, lowest offset first."""
        deadline = time.monotonic() + rpc.TRANSFER_DEADLINE_S
        try:
            while lane.sent < lane.total:
                with self._cond:
                    while not lane.queue and not self._stopped:
                        if time.monotonic() > deadline:
                            raise DataPlaneError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                 "an overlapped push waited too long for a bucket")
                        self._cond.wait(_POLL_S)
                    if self._stopped:
                        return
                    offset, count, since = heapq.heappop(lane.queue)
                    self.early += not self._after
                if self._on_wait is not None:
                    self._on_wait(time.monotonic() - since)
                pieces = lane.pieces
                if pieces is None:
                    return
                start = lane.shard.offset + offset
                pieces.send(offset, self._grad[start : start + count])
                lane.sent += 1
        except BaseException as exc:  # read by finish
            lane.error = exc
