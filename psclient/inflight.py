"""PullInFlight: a pull read on background threads, one per shard, whose elements can be used
range by range as they land (docs/network.md, "Overlap"): the next forward starts on its
first layers while later ones are still arriving.

Threading: the owner calls `heads`, `wait`, `finish` and `cancel`; the reader threads only
write their shard's part of dest and report through a condition.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import grpc

from shardps.proto import codec, common_pb2, ps_pb2
from shardps.proto.dataplane import DataPlaneError
from shardps.psclient.transport import PullWatch
from shardps.runtime import rpc

# One shard's pull: reads the reply into its part of dest, telling the watch; returns the head.
ReadShard = Callable[[int, PullWatch], ps_pb2.PullResponse]


class _Watch:
    """One shard's progress (a psclient.transport.PullWatch), under the pull's condition."""

    def __init__(self, cond: threading.Condition):
        self._cond = cond
        self.reply: ps_pb2.PullResponse | None = None  # the head, once read
        self.elements = 0  # elements of the shard landed (a prefix)
        self.done = False
        self.error: BaseException | None = None

    def head(self, head: ps_pb2.PullResponse) -> None:
        with self._cond:
            self.reply = head
            self._cond.notify_all()

    def received(self, elements: int) -> None:
        with self._cond:
            self.elements = elements
            self._cond.notify_all()


class PullInFlight:
    """A pull of every shard, read on one thread per shard (module docstring)."""

    def __init__(self, shards: Sequence[common_pb2.ShardRange], read: ReadShard, itemsize: int,
                 timeout_s: float):
        """`read(i, watch)` pulls shard i into its part of dest; `timeout_s` is what each
        shard's request lets the server wait (this waits that plus a transfer deadline)."""
        self._shards = list(shards)
        self._itemsize = itemsize
        self._cond = threading.Condition()
        self._limit_s = timeout_s + rpc.TRANSFER_DEADLINE_S
        self._watches = [_Watch(self._cond) for _ in self._shards]
        self._threads = [threading.Thread(target=self._run, args=(read, i), daemon=True,
                                          name="pull-inflight") for i in range(len(self._shards))]
        for thread in self._threads:
            thread.start()

    def _run(self, read: ReadShard, i: int) -> None:
        watch = self._watches[i]
        try:
            head = read(i, watch)
        except BaseException as exc:
            with self._cond:
                watch.error = exc
                watch.done = True
                self._cond.notify_all()
            return
        with self._cond:
            watch.reply = head
            watch.elements = self._shards[i].length if head.ready else 0
            watch.done = True
            self._cond.notify_all()

    def heads(self) -> tuple[bool, list[int], bool]:
        """Waits for every shard's reply head: (all ready, versions, some job done). Raises
        the first shard's error (after every reader has stopped)."""
        self._wait_for(lambda w: w.reply is not None or w.done)
        heads = [w.reply for w in self._watches]
        if any(h is None for h in heads):  # some reader failed before its head
            self._raise()
        ready = [h for h in heads if h is not None]
        return (all(h.ready for h in ready), [h.version for h in ready],
                any(h.job_done for h in ready))

    def wait(self, lo: int, hi: int) -> None:
        """Waits until dest[lo:hi] has landed; raises a reader's error."""
        def covered() -> bool:
            for shard, w in zip(self._shards, self._watches, strict=True):
                end = shard.offset + shard.length
                if shard.offset >= hi or end <= lo or w.done:
                    continue
                if w.elements < min(hi, end) - shard.offset:
                    return False
            return True

        self._wait_until(covered)
        if any(w.error is not None for w in self._watches):
            self._raise()

    def finish(self) -> int:
        """Waits for every reader; returns the payload bytes received. Raises the first error
        (once every reader has stopped)."""
        self._wait_for(lambda w: w.done)
        if any(w.error is not None for w in self._watches):
            self._raise()
        return sum(w.reply.length * self._itemsize for w in self._watches
                   if w.reply is not None and w.reply.ready)

    def cancel(self) -> None:
        """Waits (bounded) for the readers and drops their errors: their elements are on
        their way, and a reader left behind would write into dest later."""
        try:
            self._wait_for(lambda w: w.done)
        except DataPlaneError:
            pass

    def _raise(self) -> None:
        self._wait_for(lambda w: w.done)
        for w in self._watches:
            if w.error is not None:
                raise w.error
        raise codec.CodecError("a pull ended without its head")

    def _wait_for(self, cond: Callable[[_Watch], bool]) -> None:
        self._wait_until(lambda: all(cond(w) for w in self._watches))

    def _wait_until(self, cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self._limit_s
        with self._cond:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DataPlaneError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                         "an overlapped pull's readers did not finish")
                self._cond.wait(left)
