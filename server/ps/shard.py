"""One job's shard: fp32 weights under Adam, behind its consistency gate.

Pure core: no gRPC. The servicer decodes bytes into a staging tensor from `staging()`, then
calls `push`; pulls wait with `wait_for_pull` and read a consistent `snapshot`. The shard is
the façade over one module per concern, all guarded by its one condition: `gate` (sync
rounds, ssp clocks), `fencing` (incarnations, dedup), `updater` (the Adam step), `snapshots`
(copy-on-write reads) and `capture` (what a checkpoint holds, forced captures).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from shardps.proto import codec, common_pb2, ps_pb2
from shardps.proto.states import FINAL_STATES, MODE_NAMES

from . import schedule
from .buffers import BufferPool
from .capture import ForcedCaptures, without_open_round
from .checkpoint import ShardState
from .errors import InvalidConfigError, InvalidPushError, ShardClosedError
from .fencing import Fencing
from .gate import Gate, round_terms
from .snapshots import Snapshot, SnapshotCache
from .updater import Terms, Updater

log = logging.getLogger("shardps.ps")
_T = TypeVar("_T")

# Gradients a push may hand over: fp32, or kept in the wire dtype it arrived in.
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PushResult:
    """What one push did.

    Attributes:
        status: the expected outcome, a `ps_pb2.PushStatus` value.
        version: the shard's version after handling the push.
        staleness: async/ssp pushes that were applied: version - base_version on arrival.
        apply_seconds: time spent in Adam (and the sync mean) if this push ran a step.
    """

    status: ps_pb2.PushStatus
    version: int
    staleness: int | None = None
    apply_seconds: float | None = None


# Over the ~250-line guide (about 430 lines, 270 of them code, the rest the docstrings of its
# contract): Shard is the façade that the servicer, data plane, registry, heartbeat and
# checkpointer call, some 30 entry points, each holding the one lock while its parts (gate,
# fencing, updater, snapshots, capture) do the work; what is left here is the order of those
# calls (push admission, the step and what follows it, freezing at the final version).
# Splitting the façade itself would spread that lock's protocol over several classes.
class Shard:
    """A contiguous range [offset, offset + length) of one job's flat fp32 vector.

    Thread-safety: every method may be called from any thread. One condition variable (and its
    lock) guards all state, its parts' included; Adam runs under it, so a snapshot never sees
    half an update. Waits always take a timeout. Ownership: the shard owns its weights and
    optimizer state; a gradient passed to `push` becomes the shard's (it may be buffered or
    reused).

    Attributes:
        restored: built by `from_state` from a checkpoint (server restart), not by InitShard.
        on_applied: called under the lock after every version change, with whether a forced
            capture was just taken there (checkpoints hook here); it must not block.
    """

    def __init__(self, config: ps_pb2.ShardConfig, weights: torch.Tensor):
        """Creates version 0 from the initial weights (taken over, not copied).

        Raises:
            InvalidConfigError: bad config, or weights not a finite fp32 vector of `length`.
        """
        validate_config(config)
        _check_initial_weights(weights, config.length)
        self.config = ps_pb2.ShardConfig()
        self.config.CopyFrom(config)
        self.job_id, self.index, self.length = config.job_id, config.shard_index, config.length
        self.mode = config.mode
        self.version = self.adam_step = self.pushes_applied = 0
        self.job_state = common_pb2.JOB_STATE_RUNNING
        # sync, once the job has ended: the version the coordinator named for its final
        # weights (None until named; the open round is held meanwhile, see set_job_state).
        self.final_version: int | None = None
        self.epoch = config.epoch
        self.rollback_id = 0                             # sync: the last rollback applied
        self.restored = False
        self._workers: list[str] = list(config.workers)  # live workers, rank order
        self._closed = False
        self._waiting = 0                                # pulls blocked in wait_for_pull
        self._cond = threading.Condition(threading.Lock())
        self._staging = BufferPool(self.length, keep=max(2, len(self._workers)))
        self._updater = Updater(config.optimizer, weights)
        self._gate = Gate(self.mode, config.staleness, f"job {self.job_id} shard {self.index}",
                          self._staging.release)
        self._fencing = Fencing()
        self._snapshots = SnapshotCache(self._cond, self._updater.weights, self._staging)
        self._captures = ForcedCaptures(self._cond)
        self.on_applied: Callable[[Shard, bool], None] | None = None

    # -- state --------------------------------------------------------------------------

    @property
    def frozen(self) -> bool:
        """The job has reached a final state: pushes answer JOB_DONE, weights never change."""
        return self.job_state in FINAL_STATES

    @property
    def settled(self) -> bool:
        """Frozen with its final weights fixed: sync once the final version is named (and
        reached if it can be), other modes as soon as frozen."""
        return self.frozen and (self.mode != common_pb2.CONSISTENCY_SYNC
                                or self.final_version is not None)

    @property
    def closed(self) -> bool:
        """Dropped or replaced: no call on it will succeed any more."""
        return self._closed

    @property
    def waiting_pulls(self) -> int:
        """Pulls blocked waiting for a version or clock right now."""
        return self._waiting

    @property
    def workers(self) -> list[str]:
        with self._cond:
            return list(self._workers)

    def info(self) -> ps_pb2.ShardInfo:
        with self._cond:
            return ps_pb2.ShardInfo(
                job_id=self.job_id, shard_index=self.index, offset=self.config.offset,
                length=self.length, version=self.version, adam_step=self.adam_step,
                state=self.job_state, pushes_applied=self.pushes_applied,
                worker_clocks=dict(self._gate.clocks),
                max_clock_spread=self._gate.max_clock_spread,
                short_rounds=self._gate.short_rounds, live_workers=self._workers,
                epoch=self.epoch)

    def resident_bytes(self) -> int:
        """Bytes of fp32 weights plus Adam's m and v (once the first step created them)."""
        return self._updater.resident_bytes()

    def set_job_state(self, state: common_pb2.JobState, final_version: int | None = None) -> bool:
        """Records the coordinator's view of the job; returns True if this call froze the shard.

        A final state is sticky: later states are ignored. Freezing wakes every waiting pull
        (they answer job_done) and refuses pushes from then on (JOB_DONE). async and ssp drop
        their pushes in flight. sync, until the job's `final_version` is named, holds the
        open round: a push into it is kept (and still answered JOB_DONE), never applied, so
        that once named a shard one round behind the others can close that round with the
        same pushes they applied; a round past the final version is dropped.
        """
        with self._cond:
            if state == common_pb2.JOB_STATE_UNSPECIFIED or self.settled:
                return False
            froze = not self.frozen and state in FINAL_STATES
            if not self.frozen:
                self.job_state = state
                if not froze:
                    return False
                if not self._gate.sync:
                    self._gate.drop_round()
                self._cond.notify_all()
            naming = self.mode == common_pb2.CONSISTENCY_SYNC and final_version is not None
            if not froze and not naming:
                return False  # still waiting for the final version to be named
            if naming:
                assert final_version is not None
                self._settle(final_version)
            version, final = self.version, self.final_version
        log.info("job %s shard %d %s at version %d (%s)%s", self.job_id, self.index,
                 "frozen" if froze else "settled", version, common_pb2.JobState.Name(state),
                 "" if final is None else f"; the job's final version is {final}")
        if final is not None and version != final:
            log.error("job %s shard %d is at version %d, not the job's final version %d: its "
                      "weights are not the job's final weights (export refuses them)",
                      self.job_id, self.index, version, final)
        return froze

    def _settle(self, final_version: int) -> None:
        """sync: the final version is named; close the held round if it leads there."""
        if self.version == final_version - 1 and self._gate.complete(self._workers):
            self._close_round()
        self._gate.drop_round()
        self.final_version = final_version
        self._cond.notify_all()

    def update_workers(self, workers: list[str], epoch: int) -> bool:
        """Adopts the job's live workers (rank order) of membership `epoch`.

        Views older than the current epoch are ignored. If the live set shrank so that an open
        sync round now has every remaining contribution, the round completes here. Returns
        True if it did.
        """
        with self._cond:
            if epoch < self.epoch or self._closed:
                return False
            changed = workers != self._workers
            self.epoch = epoch
            if not changed:
                return False
            self._workers = list(workers)
            self._staging.keep = max(2, len(workers))
            completed = False
            if self._gate.sync and not self.frozen:
                completed = self._gate.complete(self._workers) and self._close_round() is not None
            self._cond.notify_all()  # ssp: the slowest worker may have left
            version = self.version
        log.info("job %s shard %d: workers %s (epoch %d)%s", self.job_id, self.index,
                 ",".join(workers) or "-", epoch,
                 f"; round completed with the remaining workers, version {version}"
                 if completed else "")
        return completed

    def fence(self, live: dict[str, int]) -> None:
        """Adopts the live workers' incarnations from the coordinator (worker -> incarnation).

        A worker that left the live set, or is live under a newer incarnation, has its old
        incarnation fenced: its pushes are refused from now on.
        """
        with self._cond:
            self._fencing.adopt(live)

    def close(self) -> None:
        """Marks the shard dropped (or replaced): waits end, later calls raise ShardClosedError."""
        with self._cond:
            self._closed = True
            self._gate.drop_round()
            self._snapshots.clear_locked()
            self._staging.clear()
            self._cond.notify_all()

    # -- checkpoints ----------------------------------------------------------------------

    def capture(self) -> ShardState:
        """A consistent copy of everything a checkpoint holds (copies under the lock)."""
        with self._cond:
            return self.capture_locked()

    def capture_locked(self) -> ShardState:
        """As `capture`, for callers that hold the lock (the `on_applied` hook).

        A sync round still open is not part of the state (see capture.without_open_round).
        """
        fencing = self._fencing
        applied, clocks = without_open_round(fencing.applied, self._gate.clocks,
                                             self._gate.round, self.version)
        return ShardState(
            config=self.config, version=self.version, adam_step=self.adam_step,
            pushes_applied=self.pushes_applied, job_state=self.job_state, epoch=self.epoch,
            workers=list(self._workers), tensors=self._updater.copy_tensors(),
            incarnations=dict(fencing.incarnations), departed=dict(fencing.departed),
            clocks=clocks, applied=applied, rollback_id=self.rollback_id)

    def capture_at(self, at_version: int, timeout: float) -> tuple[ShardState, float]:
        """A capture at exactly `at_version`, waiting up to `timeout` s for a push to reach it;
        the current state if it is reached already, the job was frozen when asked, or the wait
        times out. Returns the state and the seconds its copy held the lock."""
        # A freeze during the wait does not end it: a sync round held at the freeze may still
        # close when the final version is named.
        request = self._captures.wait(at_version,
                                      lambda: self.version < at_version and not self.frozen,
                                      lambda: self._closed, self.capture_locked, timeout)
        assert request.state is not None  # wait() always fills it
        return request.state, request.copy_seconds

    def load_state(self, state: ShardState, tables: bool = True) -> None:
        """Replaces weights, Adam state and version with a checkpoint's (rollback, resume).

        `tables` also takes its workers, epoch, clocks and applied-push and fencing tables
        (False for a resumed job, which starts them afresh). An open sync round is dropped;
        waiting pulls re-check. The job state stays the coordinator's.

        Raises:
            InvalidConfigError: the checkpoint is of a different length.
        """
        with self._cond:
            self._updater.check(state.tensors)
            self._snapshots.detach_readers_locked()
            self._updater.load(state.tensors)
            self.version, self.adam_step = state.version, state.adam_step
            self.pushes_applied = state.pushes_applied
            self.rollback_id = state.rollback_id
            if tables:
                self.epoch = state.epoch
                self._workers = list(state.workers)
                self._fencing.load(state.incarnations, state.departed, state.applied)
                self._gate.clocks = dict(state.clocks)
            self._gate.drop_round()
            self._snapshots.clear_locked()
            self._cond.notify_all()

    @classmethod
    def from_state(cls, state: ShardState) -> Shard:
        """A shard as it was when `state` was captured (server restart)."""
        shard = cls(state.config, state.tensors["weights"].clone())
        shard.load_state(state)
        shard.job_state = state.job_state
        shard.restored = True
        return shard

    # -- push ---------------------------------------------------------------------------

    def staging(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A buffer of `length` elements to decode a push into (contents undefined).

        `dtype` may be the push's wire dtype (bf16/fp16): the gradient is then kept as it came,
        in half the memory, and cast to fp32 block by block when it is applied. The caller
        passes it to `push` (which takes it over) or hands it back with `release_staging` if
        the push fails before that.
        """
        return self._staging.acquire(dtype)

    def release_staging(self, grad: torch.Tensor) -> None:
        self._staging.release(grad)

    def check_push(self, *, worker_id: str, incarnation: int = 0, step: int, length: int,
                   batch_size: int = 1) -> ps_pb2.PushStatus | None:
        """Checks a push header before its chunks are read.

        Returns the outcome if it is already decided (JOB_DONE, DUPLICATE, STALE; none of
        these can change back), else None. Raises the same errors as `push`.
        """
        with self._cond:
            return self._check(worker_id, incarnation, step, length, batch_size)

    def push(self, grad: torch.Tensor, *, worker_id: str, incarnation: int = 0, step: int,
             base_version: int = 0, batch_size: int = 1, checked: bool = False) -> PushResult:
        """Handles one worker's gradient for one step; takes over `grad`.

        async/ssp: one Adam step on arrival. sync: buffered in the round of `step`; the last
        live worker's push runs one Adam step on the batch-size-weighted mean. `checked`: the
        caller has already verified every value is finite (the servicer does, chunk by chunk
        as the gradient arrives), so the whole-vector check is skipped. A value beyond
        codec.MAX_GRADIENT is refused like NaN: Adam's second moment would overflow.

        Raises:
            InvalidPushError: wrong length, bad batch size or step, non-finite values or
                values beyond codec.MAX_GRADIENT.
            FencedError: this worker incarnation was declared dead.
            UnknownWorkerError: worker not among the live workers.
            StepAheadError: sync, `step` is beyond the open round.
            ShardClosedError: the shard was dropped or replaced.
        Nothing changes when it raises.
        """
        _check_gradient(grad, self.length)
        # Outside the lock: the check reads the whole gradient.
        if not checked and not codec.pushable(grad):
            refused = unpushable(grad)
            self._staging.release(grad)
            raise refused
        keep = False
        try:
            with self._cond:
                early = self._check(worker_id, incarnation, step, grad.numel(), batch_size)
                if early is not None:
                    return PushResult(early, self.version)
                if self.frozen:  # held, never applied unless the final version needs it
                    self._gate.hold(worker_id, batch_size, grad)
                    keep = True
                    return PushResult(ps_pb2.PUSH_STATUS_JOB_DONE, self.version)
                self._fencing.record(worker_id, incarnation, step)
                self._gate.record(worker_id, step)
                if self._gate.sync:
                    keep = True
                    if not self._gate.contribute(worker_id, batch_size, grad, self._workers):
                        self._cond.notify_all()  # clocks moved
                        return PushResult(ps_pb2.PUSH_STATUS_ACCEPTED, self.version)
                    seconds = self._close_round()
                    return PushResult(ps_pb2.PUSH_STATUS_APPLIED, self.version,
                                      apply_seconds=seconds)
                staleness = max(0, self.version - base_version)
                seconds = self._step([(grad, None)])
                self._applied(1)
                return PushResult(ps_pb2.PUSH_STATUS_APPLIED, self.version, staleness, seconds)
        finally:
            if not keep:
                self._staging.release(grad)

    def _check(self, worker_id: str, incarnation: int, step: int, length: int,
               batch_size: int) -> ps_pb2.PushStatus | None:
        if self._closed:
            raise ShardClosedError("shard was dropped or replaced")
        _check_header(length, self.length, step, batch_size)
        if self.frozen and not (self.final_version is None
                                and self._gate.holds(worker_id, step, self.version, self._workers)):
            return ps_pb2.PUSH_STATUS_JOB_DONE
        budget = self.config.step_budget
        if self._gate.sync and budget and step >= budget:
            return ps_pb2.PUSH_STATUS_JOB_DONE  # known in advance: no shard passes the budget
        early = self._fencing.check(worker_id, incarnation, step, self._workers)
        return early if early is not None else self._gate.check(worker_id, step, self.version)

    # -- steps (caller holds the lock) --------------------------------------------------

    def _close_round(self) -> float | None:
        """Steps on the open round's live contributions; None if none was left (it stays
        open). Returns the seconds spent, the mean and the bookkeeping included."""
        parts = self._gate.take_round(self._workers, self.version)
        if not parts:
            return None
        start = time.perf_counter()
        self._step(round_terms(parts))
        self._applied(len(parts))
        for part in parts:
            self._staging.release(part.grad)
        return time.perf_counter() - start

    def _step(self, terms: Terms) -> float:
        """One Adam step with the scheduled lr; version += 1. Returns the seconds spent."""
        start = time.perf_counter()
        self._snapshots.detach_readers_locked()
        self._updater.step(terms, schedule.learning_rate(self.config.optimizer, self.adam_step))
        self.adam_step += 1
        self.version += 1
        return time.perf_counter() - start

    def _applied(self, pushes: int) -> None:
        """After a step: counts its pushes, fills forced captures waiting for this version,
        tells the checkpoint side, wakes waiting pulls."""
        self.pushes_applied += pushes
        forced = self._captures.fulfil_locked(self.version, self.capture_locked)
        if self.on_applied is not None:
            self.on_applied(self, forced)
        self._cond.notify_all()

    # -- pull ---------------------------------------------------------------------------

    def wait_for_pull(self, min_version: int, clock: float, timeout: float,
                      cancelled: Callable[[], bool] | None = None) -> bool:
        """Waits up to `timeout` s until version >= min_version and (ssp) the clock gate opens.

        `clock` -inf waits for the version only. Returns whether both hold. Returns early
        (False unless they hold) when the job is frozen or the shard closed, since nothing
        will change any more, or when `cancelled()` turns true after a `wake()`.
        """
        def reached() -> bool:
            return self.version >= min_version and self._gate.clock_ok(clock, self._workers)

        def done() -> bool:
            return (reached() or self.frozen or self._closed
                    or (cancelled is not None and cancelled()))

        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(done, max(0.0, timeout))
            finally:
                self._waiting -= 1
            if not reached():
                return False
            if math.isfinite(clock):
                self._gate.granted(clock, self._workers)
            return True

    def wake(self) -> None:
        """Makes waiting pulls re-check their `cancelled` callbacks."""
        with self._cond:
            self._cond.notify_all()

    def snapshot(self, dtype: torch.dtype = torch.float32) -> Snapshot:
        """The current version of the weights in `dtype`; give it back with `release`.

        Pulls of the same version and dtype share one entry, which is never written while
        anyone holds it.
        """
        with self._cond:
            if self._closed:
                raise ShardClosedError("shard was dropped or replaced")
            return self._snapshots.take_locked(self.version, self.frozen, dtype)

    def read(self, snapshot: Snapshot, start: int, end: int,
             fn: Callable[[torch.Tensor], _T]) -> _T:
        """Returns fn(view of elements [start, end) of the snapshot), called under the lock.

        The view is fp32 (the live weights) or the snapshot's dtype (its copy); fn must not
        keep it. Building a pull message from it is the one copy a pull makes.
        """
        return self._snapshots.read(snapshot, start, end, fn)

    def release(self, snapshot: Snapshot) -> None:
        """Hands back a snapshot; its tensor must not be used afterwards."""
        self._snapshots.release(snapshot)


def validate_config(config: ps_pb2.ShardConfig) -> None:
    """Raises InvalidConfigError unless the config describes a shard this server can run."""
    if not config.job_id:
        raise InvalidConfigError("config.job_id is empty")
    if config.shard_index < 0 or config.offset < 0 or config.length <= 0:
        raise InvalidConfigError(
            f"bad range: index {config.shard_index}, offset {config.offset}, "
            f"length {config.length}")
    if config.total < config.offset + config.length:
        raise InvalidConfigError(
            f"range [{config.offset}, {config.offset + config.length}) exceeds total "
            f"{config.total}")
    if config.mode not in MODE_NAMES:
        raise InvalidConfigError(f"unknown consistency mode {config.mode}")
    if config.staleness < 0:
        raise InvalidConfigError(f"staleness must be >= 0, got {config.staleness}")
    if len(set(config.workers)) != len(config.workers):
        raise InvalidConfigError("worker ids are not unique")
    schedule.validate(config.optimizer)


def _check_initial_weights(weights: torch.Tensor, length: int) -> None:
    if weights.dtype != torch.float32 or weights.dim() != 1 or weights.numel() != length:
        raise InvalidConfigError(f"initial weights must be fp32[{length}], got {weights.dtype} "
                                 f"{tuple(weights.shape)}")
    if not codec.finite(weights):
        raise InvalidConfigError("initial weights have non-finite values")


def _check_header(length: int, expected: int, step: int, batch_size: int) -> None:
    """Raises InvalidPushError for a push header no shard state could accept."""
    if length != expected:
        raise InvalidPushError(f"push length {length} != shard length {expected}", "bad_length")
    if step < 0:
        raise InvalidPushError(f"step must be >= 0, got {step}", "bad_step")
    if batch_size < 0:
        raise InvalidPushError(f"batch_size must be >= 0, got {batch_size}", "bad_batch_size")


def _check_gradient(grad: torch.Tensor, length: int) -> None:
    if grad.dtype not in _GRAD_DTYPES or grad.dim() != 1 or grad.numel() != length:
        raise InvalidPushError(f"gradient must be fp32[{length}] (or bf16/fp16), got "
                               f"{grad.dtype} {tuple(grad.shape)}", "bad_length")


def unpushable(grad: torch.Tensor) -> InvalidPushError:
    """Why a gradient that is not codec.pushable is refused: non-finite values, or values so
    large that Adam's second moment (a mean of g*g, in fp32) would overflow to inf, after
    which those weights would never move again."""
    if not codec.finite(grad):
        return InvalidPushError("gradient has non-finite values", "non_finite")
    return InvalidPushError(
        f"gradient has values beyond +-{codec.MAX_GRADIENT:.3g} (largest "
        f"{float(grad.abs().max()):.3g}): Adam's state would overflow", "too_large")
