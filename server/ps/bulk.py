"""Push and Pull handling shared by both transports: the gRPC service (servicer.py) and the
raw-TCP data plane (dataserver.py). A transport parses the request, supplies the gradient's
bytes through a `fill` callback and sends what a pull returns; every decision, metric and
refusal lives here. Refusals are `Refused` exceptions carrying a gRPC status code, raised
before any shard state changes.

Also the fault hook for tests: `SHARDPS_FAULT_DROP_PUSH_REPLY=N` makes the server handle its
N-th push normally and then fail instead of replying, as if the reply had been lost on the
way back (the worker retries it: the retry must be a DUPLICATE).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from shardps.proto import codec, common_pb2, compress, names, ps_pb2
from shardps.proto.tables import TableIdError, TableRowsError

from . import compressed, pieces, pull_deltas
from .errors import (
    FencedError,
    InvalidConfigError,
    InvalidPushError,
    ShardClosedError,
    ShardError,
    StepAheadError,
    TableMemoryError,
    UnknownShardError,
    UnknownWorkerError,
)
from .forwarding import OnPiece
from .joining import Joining, TransferRefused
from .metrics import PSMetrics
from .pushes import unpushable
from .registry import ShardRegistry
from .replication import DROPPED, OUT_OF_TOUCH, ReplicaRefused, Replicas
from .shard import Shard
from .snapshots import Snapshot
from .tables import RowsAfterStartError, UnknownTableError

log = logging.getLogger("shardps.ps")

MAX_PULL_WAIT_S = 60.0  # a pull never holds a server thread longer than this
DROP_REPLY_ENV = "SHARDPS_FAULT_DROP_PUSH_REPLY"
MAX_QUEUED_LENGTH = 2**32  # elements of a push queued by a joining copy (its shard unknown yet)
_T = TypeVar("_T")

CODES = {
    UnknownShardError: grpc.StatusCode.NOT_FOUND,
    ShardClosedError: grpc.StatusCode.NOT_FOUND,
    UnknownWorkerError: grpc.StatusCode.FAILED_PRECONDITION,
    FencedError: grpc.StatusCode.FAILED_PRECONDITION,
    StepAheadError: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidPushError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    TableMemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # Embedding tables (rows.py): the message names the table (and the id).
    UnknownTableError: grpc.StatusCode.INVALID_ARGUMENT,
    TableIdError: grpc.StatusCode.INVALID_ARGUMENT,
    TableRowsError: grpc.StatusCode.INVALID_ARGUMENT,
    RowsAfterStartError: grpc.StatusCode.FAILED_PRECONDITION,
}
_STATUS_NAMES = {
    value: name.removeprefix("PUSH_STATUS_").lower()
    for name, value in ps_pb2.PushStatus.items()
}

# fill(grad) writes the push's elements into grad (the wire dtype; fp32 for a compressed push,
# decoded by compressed.decode_into) and returns (bytes received, whether every value is
# codec.pushable: finite and within codec.MAX_GRADIENT); it raises codec.CodecError on bad
# bytes, InvalidPushError on a compressed body that does not decode.
# `on_piece`, where not None, is told of each piece of the elements as it lands
# (forwarding.OnPiece; a data-plane push that is not compressed tells it of every piece).
Fill = Callable[[torch.Tensor, OnPiece | None], tuple[int, bool]]


class Refused(Exception):
    """A call refused with a gRPC status code; nothing changed."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(names.cut(message))  # sent on gRPC and on the data plane
        self.code = code


def refusal(exc: Exception) -> Refused:
    return Refused(CODES.get(type(exc), grpc.StatusCode.INVALID_ARGUMENT), str(exc))


class DropReplies:
    """Which pushes lose their reply: the N-th handled by this process, from `spec` "N"
    (test hook; "" never). Thread-safe."""

    def __init__(self, spec: str):
        self.nth = int(spec) if spec.isdigit() and int(spec) > 0 else 0
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self.dropped = 0

    def drop(self, reply: ps_pb2.PushResponse) -> bool:
        if not self.nth:
            return False
        with self._lock:
            hit = next(self._count) == self.nth
            self.dropped += hit
        if hit:
            log.warning("fault injected (%s): push handled (%s, version %d), reply dropped",
                        DROP_REPLY_ENV, ps_pb2.PushStatus.Name(reply.status), reply.version)
        return hit


@dataclass
class PullPlan:
    """What a pull sends: `head` (its PullResponse without chunks) and, when ready, the
    snapshot whose elements follow; call `done` once sent (or abandoned)."""

    head: ps_pb2.PullResponse
    shard: Shard
    snapshot: Snapshot | None
    dtype: torch.dtype
    started: float
    delta: bytes | None = None  # a compressed pull's delta, sent instead of the elements
    # A compressed pull's dense reset: the worker's new mirror (pull_deltas.py; never changed
    # in place), whose elements are sent instead of the snapshot's. It is the weights' copy,
    # or, after a restore, the copy the workers held (which the weights are not).
    dense: torch.Tensor | None = None


class BulkOps:
    """Push and pull on a ShardRegistry, for any transport. Thread-safe (the shards lock)."""

    def __init__(self, shards: ShardRegistry, metrics: PSMetrics, faults: DropReplies,
                 replicas: Replicas | None = None):
        self.shards = shards
        self.metrics = metrics
        self.faults = faults
        # Replicated shards (replication.py): who is primary, and the forward to backups.
        self.replicas = replicas if replicas is not None else Replicas(lambda: "")
        # Joining copies (joining.py): forwarded pushes queued until the state arrives.
        self.joining = Joining(shards, lambda: "")
        self.stopping = False

    def _reject(self, exc: Exception, reason: str) -> Refused:
        self.metrics.rejected.labels(reason).inc()
        log.debug("push rejected (%s): %s", reason, exc)
        return refusal(exc)

    # -- push -------------------------------------------------------------------------

    def push(self, header: ps_pb2.PushHeader, fill: Fill) -> ps_pb2.PushResponse:
        """Handles one push; `fill` is called at most once, only if the push needs its
        elements. Raises Refused (the rejection counted by reason)."""
        start = time.perf_counter()
        if (queued := self._queue_joining(header, fill)) is not None:
            return queued
        shard, wire = self._push_target(header)
        try:
            self.replicas.check(header)
        except ReplicaRefused as exc:
            raise self._replica_refused(exc) from None
        self._check_rollback(shard, header)
        try:
            early = shard.check_push(length=header.length, worker_id=header.worker_id,
                                     incarnation=header.incarnation, step=header.step,
                                     batch_size=header.batch_size)
        except ShardError as exc:
            raise self._reject(exc, exc.reason) from None
        if early is not None and not (early == ps_pb2.PUSH_STATUS_DUPLICATE
                                      and self.replicas.owed(header)):
            # Decided by the header alone (JOB_DONE, DUPLICATE, STALE): the elements are not read.
            # (A duplicate a backup may lack is read, and forwarded again in the turn below.)
            return self._pushed(shard, early, shard.version, start)

        grad = shard.staging(wire)  # kept in the wire dtype
        applying, handed = 0.0, False
        try:
            # A replicated shard's primary sends the push to its backups as it arrives (or
            # once it is in), applies it, and raises ReplicaRefused (after the apply) unless
            # every backup took it.
            with self.replicas.turn(header, grad) as turn:
                received = self._receive(fill, grad, turn.on_piece)
                self.metrics.push_bytes.labels(shard.job_id).inc(received)
                if (way := turn.forward()) is not None:
                    self.metrics.forwards.labels(way).inc()
                applying, handed = time.perf_counter(), True  # push takes `grad` over
                result = shard.push(grad, base_version=header.base_version, checked=True,
                                    worker_id=header.worker_id, incarnation=header.incarnation,
                                    step=header.step, batch_size=header.batch_size)
        except ShardError as exc:
            raise self._reject(exc, exc.reason) from None
        except ReplicaRefused as exc:
            if not handed:
                shard.release_staging(grad)
            raise self._replica_refused(exc) from None
        except BaseException:
            if not handed:
                shard.release_staging(grad)
            raise
        if result.apply_seconds is not None:  # this push ran a step: time all of its apply
            self.metrics.apply_seconds.observe(time.perf_counter() - applying)
        if result.staleness is not None:
            self.metrics.staleness.labels(shard.job_id).observe(result.staleness)
        return self._pushed(shard, result.status, result.version, start)

    def _receive(self, fill: Fill, grad: torch.Tensor, on_piece: OnPiece | None) -> int:
        """Fills `grad` with the push's elements; the bytes received. Raises Refused (counted)
        for bad bytes, a compressed body that does not decode, or values not pushable; the
        caller releases `grad` then."""
        try:
            received, finite = fill(grad, on_piece)
        except codec.CodecError as exc:
            raise self._reject(exc, "bad_chunks") from None
        except InvalidPushError as exc:  # a compressed body that does not decode
            raise self._reject(exc, exc.reason) from None
        if not finite:
            why = unpushable(grad)  # a second look only for a push being refused
            raise self._reject(why, why.reason) from None
        return received

    def _check_rollback(self, shard: Shard, header: ps_pb2.PushHeader) -> None:
        """Refuses (UNAVAILABLE) a push computed before a rollback this shard has applied: it
        would close a round of the replayed steps with a gradient the worker then sends
        again, leaving this shard a round ahead of those that had not rolled back yet. The
        worker retries, and takes the rollback before its next try (its heartbeat brings it)."""
        if header.HasField("rollback_id") and header.rollback_id < shard.rollback_id:
            self.metrics.rejected.labels("before_rollback").inc()
            raise Refused(grpc.StatusCode.UNAVAILABLE, (
                f"push of step {header.step} to job {header.job_id} shard {header.shard_index} "
                f"was computed before rollback {shard.rollback_id}, which the shard has "
                f"applied (the worker has taken rollback {header.rollback_id}); take the "
                "rollback, then push again"))

    def _queue_joining(self, header: ps_pb2.PushHeader, fill: Fill) -> ps_pb2.PushResponse | None:
        """A forwarded push to a shard joining here, queued until its state arrives."""
        if header.replica_epoch == 0:
            return None
        try:
            names.check(header.job_id, "job_id")
            names.check(header.worker_id, "worker_id")
            if not 0 <= header.length <= MAX_QUEUED_LENGTH:
                raise InvalidPushError(f"length {header.length} out of range", "bad_length")
            compressed.staging_dtype(header)
            return self.joining.queue(header, fill)
        except (names.InvalidName, InvalidPushError, codec.CodecError) as exc:
            raise self._reject(exc, "bad_header") from None
        except TransferRefused as exc:
            raise Refused(exc.code, str(exc)) from None

    def _replica_refused(self, exc: ReplicaRefused) -> Refused:
        reason = "not_primary" if exc.code == grpc.StatusCode.UNAVAILABLE else "stale_replica"
        if "did not take" in str(exc):
            reason = "backup_failed"
        elif str(exc).startswith(OUT_OF_TOUCH):
            reason = "out_of_touch"
        self.metrics.rejected.labels(reason).inc()
        log.debug("push refused (%s): %s", reason, exc)
        return Refused(exc.code, str(exc))

    def _push_target(self, header: ps_pb2.PushHeader) -> tuple[Shard, torch.dtype]:
        """The shard a push header names and the dtype its elements are staged in; Refused
        for a malformed name, an unknown shard, a bad dtype or a bad compression header."""
        try:
            names.check(header.job_id, "job_id")
            names.check(header.worker_id, "worker_id")
        except names.InvalidName as exc:
            raise self._reject(exc, "bad_header") from None
        try:
            shard = self.shards.get(header.job_id, header.shard_index)
        except UnknownShardError as exc:
            raise self._reject(exc, exc.reason) from None
        try:
            wire = compressed.staging_dtype(header)
        except codec.CodecError as exc:
            raise self._reject(exc, "bad_dtype") from None
        try:
            if compressed.is_compressed(header):
                compressed.check_header(header)
            pieces.check_header(header, compressed.is_compressed(header))
        except InvalidPushError as exc:
            raise self._reject(exc, exc.reason) from None
        return shard, wire

    def _pushed(self, shard: Shard, status: ps_pb2.PushStatus, version: int,
                start: float) -> ps_pb2.PushResponse:
        self.metrics.pushes.labels(shard.job_id, _STATUS_NAMES[status]).inc()
        self.metrics.push_seconds.observe(time.perf_counter() - start)
        return ps_pb2.PushResponse(status=status, version=version)

    # -- pull -------------------------------------------------------------------------

    def pull(self, request: ps_pb2.PullRequest, is_active: Callable[[], bool],
             on_leave: Callable[[Callable[[], None]], object] | None = None) -> PullPlan:
        """Waits (at most MAX_PULL_WAIT_S) for the requested version and plans the reply.

        `is_active` says whether the caller is still there; `on_leave`, when the transport
        can tell, registers a callback run when the caller goes away. Raises Refused.
        """
        try:
            names.check(request.job_id, "job_id")
            shard = self.shards.get(request.job_id, request.shard_index)
            dtype = codec.torch_dtype(request.dtype)
            if request.compress:
                pull_deltas.check_request(request.compress, request.dtype, request.worker_id,
                                          request.reply_tag)
        except (ShardError, codec.CodecError, names.InvalidName, ValueError) as exc:
            raise refusal(exc) from None
        clock = request.clock if shard.mode == common_pb2.CONSISTENCY_SSP else 0
        timeout = min(max(request.timeout_ms, 0) / 1000, MAX_PULL_WAIT_S)

        def cancelled() -> bool:
            # A copy the map no longer names (its shard moved away or failed over) never
            # reaches a newer version: answer not ready at once, and the worker re-reads
            # the map (the daemon then frees the copy: ParameterServerDaemon._drop_dropped).
            return (self.stopping or not is_active()
                    or self.replicas.describe(shard.job_id, shard.index)[1] == DROPPED)

        if on_leave is not None:
            on_leave(shard.wake)  # a client that goes away ends the wait at once
        ready = shard.wait_for_pull(request.min_version, clock, timeout, cancelled)
        start = time.perf_counter()
        if not ready:
            if self.stopping:
                raise Refused(grpc.StatusCode.UNAVAILABLE, "server shutting down")
            if shard.closed:
                raise refusal(ShardClosedError("shard was dropped or replaced"))
            self.metrics.pulls.labels(shard.job_id).inc()
            head = ps_pb2.PullResponse(ready=False, version=shard.version, length=shard.length,
                                       job_done=shard.frozen)
            return PullPlan(head, shard, None, dtype, start)
        try:
            snapshot = shard.snapshot(dtype)
        except ShardError as exc:
            raise refusal(exc) from None
        head = ps_pb2.PullResponse(ready=True, version=snapshot.version, length=shard.length,
                                   job_done=snapshot.job_done)
        plan = PullPlan(head, shard, snapshot, dtype, start)
        if request.compress:
            self._plan_delta(plan, request)
        return plan

    def _plan_delta(self, plan: PullPlan, request: ps_pb2.PullRequest) -> None:
        """A compressed pull: the delta against the worker's copy, or (no copy at the version
        it names) dense weights, with the worker's mirror brought to what it will hold."""
        assert plan.snapshot is not None
        held = plan.shard.mirrors.copies(request.compress)
        live, version = plan.shard.workers, plan.snapshot.version

        def reply(view: torch.Tensor) -> pull_deltas.PullReply:
            held.forget_except([*live, request.worker_id])
            return held.reply(request.worker_id, request.held_tag, view, request.reply_tag, version=version)

        answer = plan.shard.read(plan.snapshot, 0, plan.shard.length, reply)
        plan.dense = answer.dense
        if answer.delta is not None:
            plan.delta = answer.delta
            plan.head.delta_compression = compress.PUSH_COMPRESSIONS[compress.codec_of(answer.delta)]
            plan.head.compressed_bytes = len(answer.delta)

    def pieces(self, plan: PullPlan, step: int,
               fn: Callable[[int, torch.Tensor], _T]) -> Iterator[_T]:
        """fn(offset, view) for consecutive ranges of `step` elements of a ready pull's
        snapshot, under the shard's lock, or of its dense reset, never changed in place, without
        it (fn copies out of the view, which it must not keep)."""
        assert plan.snapshot is not None
        dense, length = plan.dense, plan.shard.length
        for lo in range(0, length, step):
            hi = min(lo + step, length)
            yield (fn(lo, dense[lo:hi]) if dense is not None
                   else plan.shard.read(plan.snapshot, lo, hi, functools.partial(fn, lo)))

    def pulled(self, plan: PullPlan, sent_bytes: int) -> None:
        """Ends a pull (sent or abandoned): hands the snapshot back and counts it."""
        if plan.snapshot is None:
            return
        plan.shard.release(plan.snapshot)
        job = plan.shard.job_id
        self.metrics.pulls.labels(job).inc()
        self.metrics.pull_bytes.labels(job).inc(sent_bytes)
        self.metrics.pull_seconds.observe(time.perf_counter() - plan.started)
