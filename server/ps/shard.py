"""One job's shard: fp32 weights, torch Adam over them, and the consistency gate.

Pure core: no gRPC. The servicer decodes bytes into a staging tensor from `staging()`, then
calls `push`; pulls wait with `wait_for_pull` and read a consistent `snapshot`.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from shardps.proto import codec, common_pb2, ps_pb2, refusals

from . import adam as adam_lib
from . import schedule
from .buffers import BufferPool
from .checkpoint import ShardState
from .errors import (
    FencedError,
    InvalidConfigError,
    InvalidPushError,
    ShardClosedError,
    StepAheadError,
    UnknownWorkerError,
)

log = logging.getLogger("shardps.ps")
_T = TypeVar("_T")

FINAL_STATES = frozenset({
    common_pb2.JOB_STATE_COMPLETED,
    common_pb2.JOB_STATE_CONVERGED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
})
# Gradients a push may hand over: fp32, or kept in the wire dtype it arrived in.
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = {
    common_pb2.CONSISTENCY_SYNC: "sync",
    common_pb2.CONSISTENCY_SSP: "ssp",
    common_pb2.CONSISTENCY_ASYNC: "async",
}


@functools.cache
def fused_adam_available() -> bool:
    """Whether this torch has fused Adam for CPU tensors (torch >= 2.4); shards then run it
    through adam.FusedAdam (same kernel and results as `torch.optim.Adam(fused=True)`)."""
    return adam_lib.available()


@dataclass(frozen=True)
class PushResult:
    """What one push did.

    Attributes:
        status: the expected outcome, a `ps_pb2.PushStatus` value.
        version: the shard's version after handling the push.
        staleness: async/ssp pushes that were applied: version - base_version on arrival.
        apply_seconds: time spent in Adam (and the sync mean) if this push ran a step.
    """

    status: int
    version: int
    staleness: int | None = None
    apply_seconds: float | None = None


@dataclass(frozen=True)
class Snapshot:
    """One version of the weights in a wire dtype; hand it back with `Shard.release`.

    Read it with `Shard.read`, a range at a time: while the weights stay at this version that
    reads them in place, and a step that changes them first copies them for the snapshots
    still held (copy on write), so a pull costs no full copy unless an apply overlaps it.
    `tensor` is a whole copy, made on first use.
    """

    version: int
    job_done: bool
    dtype: torch.dtype
    _entry: _CachedCopy
    _shard: Shard

    @property
    def tensor(self) -> torch.Tensor:
        return self._shard._materialize(self._entry)


class _CachedCopy:
    """The weights of one version in one dtype, shared by every pull of that version: the live
    weights themselves (`tensor` None) until a step copies them for the pulls still reading."""

    def __init__(self, version: int, dtype: torch.dtype):
        self.tensor: torch.Tensor | None = None
        self.version = version
        self.dtype = dtype
        self.refs = 0


@dataclass
class _Contribution:
    batch_size: int
    grad: torch.Tensor


class Shard:
    """A contiguous range [offset, offset + length) of one job's flat fp32 vector.

    Thread-safety: every method may be called from any thread. One condition variable (and its
    lock) guards all state; Adam runs under it, so a snapshot never sees half an update.
    Waits always take a timeout. Ownership: the shard owns its weights and optimizer state;
    a gradient passed to `push` becomes the shard's (it may be buffered or reused).
    """

    def __init__(self, config: ps_pb2.ShardConfig, weights: torch.Tensor):
        """Creates version 0 from the initial weights (taken over, not copied).

        Raises:
            InvalidConfigError: bad config, or weights not a finite fp32 vector of `length`.
        """
        validate_config(config)
        if weights.dtype != torch.float32 or weights.dim() != 1 or weights.numel() != config.length:
            raise InvalidConfigError(
                f"initial weights must be fp32[{config.length}], got {weights.dtype} "
                f"{tuple(weights.shape)}")
        if not all_finite(weights):
            raise InvalidConfigError("initial weights have non-finite values")
        self.config = ps_pb2.ShardConfig()
        self.config.CopyFrom(config)
        self.job_id = config.job_id
        self.index = config.shard_index
        self.length = config.length
        self.mode = config.mode
        self.staleness = config.staleness
        self.fused = fused_adam_available()

        self._weights = weights.contiguous()
        opt = config.optimizer
        self._optimizer: adam_lib.FusedAdam | torch.optim.Optimizer
        if self.fused:  # torch's fused kernel without torch.optim (see adam.py for why)
            self._optimizer = adam_lib.FusedAdam(
                [self._weights], lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                weight_decay=opt.weight_decay, decoupled=opt.name == "adamw")
        else:
            adam = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
            self._optimizer = adam([self._weights], lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                   eps=opt.eps, weight_decay=opt.weight_decay)
        self._group = self._optimizer.param_groups[0]
        self._block: torch.Tensor | None = None  # fp32 scratch of a blockwise step

        self._cond = threading.Condition(threading.Lock())
        self.version = 0
        self.adam_step = 0
        self.pushes_applied = 0
        self.job_state = common_pb2.JOB_STATE_RUNNING
        # sync, once the job has ended: the version the coordinator named for its final
        # weights (None until named; the open round is held meanwhile, see set_job_state).
        self.final_version: int | None = None
        self.epoch = config.epoch
        self._workers: list[str] = list(config.workers)
        self._clocks: dict[str, int] = {}                # worker id -> steps pushed
        self._highest: dict[tuple[str, int], int] = {}   # (worker, incarnation) -> highest step
        self._round: dict[str, _Contribution] = {}       # sync: open round (step == version)
        self._round_opened_with = 0                      # sync: live workers at its first push
        self.short_rounds = 0                            # sync: rounds closed without them all
        self.max_clock_spread = 0                        # ssp: largest spread a pull was granted at
        self._closed = False
        self._waiting = 0                                # pulls blocked in wait_for_pull
        self._staging = BufferPool(self.length, keep=max(2, len(self._workers)))
        self._copies: dict[torch.dtype, _CachedCopy] = {}
        # Fencing (docs/architecture.md, "Failures"): incarnations of the live workers as the
        # coordinator last said, and the last incarnation of each worker that left the job.
        self._incarnations: dict[str, int] = {}
        self._departed: dict[str, int] = {}
        self.rollback_id = 0                             # sync: the last rollback applied
        # Called under the shard's lock after every version change (checkpoints hook here);
        # it must not block.
        self.on_applied: Callable[[Shard], None] | None = None

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

    def weights(self) -> torch.Tensor:
        """A copy of the fp32 weights (for tests and checkpoints)."""
        with self._cond:
            return self._weights.clone()

    def optimizer_state(self) -> dict:
        """A copy of torch's optimizer state dict (for tests and checkpoints)."""
        with self._cond:
            return _deep_clone(self._optimizer.state_dict())

    def info(self) -> ps_pb2.ShardInfo:
        with self._cond:
            return ps_pb2.ShardInfo(
                job_id=self.job_id, shard_index=self.index, offset=self.config.offset,
                length=self.length, version=self.version, adam_step=self.adam_step,
                state=self.job_state, pushes_applied=self.pushes_applied,
                worker_clocks=dict(self._clocks), max_clock_spread=self.max_clock_spread,
                short_rounds=self.short_rounds, live_workers=self._workers, epoch=self.epoch)

    def resident_bytes(self) -> int:
        """Bytes of fp32 weights plus Adam's m and v (once the first step created them)."""
        state = self._optimizer.state.get(self._weights, {})
        extra = sum(t.numel() * t.element_size() for k, t in state.items()
                    if k in ("exp_avg", "exp_avg_sq"))
        return self.length * 4 + extra

    def set_job_state(self, state: int, final_version: int | None = None) -> bool:
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
                if self.mode != common_pb2.CONSISTENCY_SYNC:
                    self._drop_round()
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
        if self.version == final_version - 1 and self._round_complete():
            self._close_round()
        self._drop_round()
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
            if self.mode == common_pb2.CONSISTENCY_SYNC and not self.frozen:
                completed = self._round_complete() and self._close_round() is not None
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
            for worker, old in self._incarnations.items():
                if live.get(worker) != old:
                    self._departed[worker] = max(self._departed.get(worker, 0), old)
            self._incarnations = dict(live)

    # -- checkpoints ----------------------------------------------------------------------

    def capture(self) -> ShardState:
        """A consistent copy of everything a checkpoint holds (copies under the lock)."""
        with self._cond:
            return self.capture_locked()

    def capture_locked(self) -> ShardState:
        """As `capture`, for callers that hold the lock (the `on_applied` hook).

        A sync round still open is not part of the state: its contributions are not applied,
        so their pushes are not recorded as applied either (the workers push them again).
        """
        applied = dict(self._highest)
        clocks = dict(self._clocks)
        for worker in self._round:
            for key, step in applied.items():
                if key[0] == worker and step >= self.version:
                    applied[key] = self.version - 1
            clocks[worker] = min(clocks.get(worker, 0), self.version)
        tensors = {"weights": self._weights.clone()}
        for key, value in self._optimizer.state.get(self._weights, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value.clone()
        return ShardState(
            config=self.config, version=self.version, adam_step=self.adam_step,
            pushes_applied=self.pushes_applied, job_state=self.job_state, epoch=self.epoch,
            workers=list(self._workers), tensors=tensors,
            incarnations=dict(self._incarnations), departed=dict(self._departed),
            clocks=clocks, applied=applied, rollback_id=self.rollback_id)

    def load_state(self, state: ShardState, tables: bool = True) -> None:
        """Replaces weights, Adam state and version with a checkpoint's (rollback, resume).

        `tables` also takes its workers, epoch, clocks and applied-push and fencing tables
        (False for a resumed job, which starts them afresh). An open sync round is dropped;
        waiting pulls re-check. The job state stays the coordinator's.

        Raises:
            InvalidConfigError: the checkpoint is of a different length.
        """
        weights = state.tensors["weights"]
        if weights.dtype != torch.float32 or weights.numel() != self.length:
            raise InvalidConfigError(f"checkpoint holds {weights.dtype}[{weights.numel()}], "
                                     f"shard is fp32[{self.length}]")
        with self._cond:
            self._detach_readers()
            self._weights.copy_(weights)
            adam = {k: state.tensors[k].clone() for k in ("step", "exp_avg", "exp_avg_sq")
                    if k in state.tensors}
            if adam:
                self._optimizer.state[self._weights] = adam
            else:
                self._optimizer.state.pop(self._weights, None)
            self.version, self.adam_step = state.version, state.adam_step
            self.pushes_applied = state.pushes_applied
            self.rollback_id = state.rollback_id
            if tables:
                self.epoch = state.epoch
                self._workers = list(state.workers)
                self._incarnations = dict(state.incarnations)
                self._departed = dict(state.departed)
                self._clocks = dict(state.clocks)
                self._highest = dict(state.applied)
            self._drop_round()
            self._copies.clear()  # snapshots still held are released as stale ones
            self._cond.notify_all()

    @classmethod
    def from_state(cls, state: ShardState) -> Shard:
        """A shard as it was when `state` was captured (server restart)."""
        shard = cls(state.config, state.tensors["weights"].clone())
        shard.load_state(state)
        shard.job_state = state.job_state
        return shard

    def _applied(self) -> None:
        if self.on_applied is not None:
            self.on_applied(self)

    def close(self) -> None:
        """Marks the shard dropped (or replaced): waits end, later calls raise ShardClosedError."""
        with self._cond:
            self._closed = True
            self._drop_round()
            self._copies.clear()
            self._staging.clear()
            self._cond.notify_all()

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
                   batch_size: int = 1) -> int | None:
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
            UnknownWorkerError: worker not among the live workers.
            StepAheadError: sync, `step` is beyond the open round.
            ShardClosedError: the shard was dropped or replaced.
        Nothing changes when it raises.
        """
        if grad.dtype not in _GRAD_DTYPES or grad.dim() != 1 or grad.numel() != self.length:
            raise InvalidPushError(
                f"gradient must be fp32[{self.length}] (or bf16/fp16), got {grad.dtype} "
                f"{tuple(grad.shape)}", "bad_length")
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
                    self._round[worker_id] = _Contribution(batch_size, grad)
                    keep = True
                    return PushResult(ps_pb2.PUSH_STATUS_JOB_DONE, self.version)
                self._highest[(worker_id, incarnation)] = step
                self._clocks[worker_id] = max(self._clocks.get(worker_id, 0), step + 1)
                if self.mode == common_pb2.CONSISTENCY_SYNC:
                    if not self._round:
                        self._round_opened_with = len(self._workers)
                    self._round[worker_id] = _Contribution(batch_size, grad)
                    keep = True
                    if not self._round_complete():
                        self._cond.notify_all()  # clocks moved
                        return PushResult(ps_pb2.PUSH_STATUS_ACCEPTED, self.version)
                    seconds = self._close_round()
                    return PushResult(ps_pb2.PUSH_STATUS_APPLIED, self.version,
                                      apply_seconds=seconds)
                staleness = max(0, self.version - base_version)
                seconds = self._step([(grad, None)])
                self.pushes_applied += 1
                self._applied()
                self._cond.notify_all()
                return PushResult(ps_pb2.PUSH_STATUS_APPLIED, self.version, staleness, seconds)
        finally:
            if not keep:
                self._staging.release(grad)

    def _check(self, worker_id: str, incarnation: int, step: int, length: int,
               batch_size: int) -> int | None:
        if self._closed:
            raise ShardClosedError("shard was dropped or replaced")
        if length != self.length:
            raise InvalidPushError(f"push length {length} != shard length {self.length}",
                                   "bad_length")
        if step < 0:
            raise InvalidPushError(f"step must be >= 0, got {step}", "bad_step")
        if batch_size < 0:
            raise InvalidPushError(f"batch_size must be >= 0, got {batch_size}", "bad_batch_size")
        if self.frozen and not self._holds(worker_id, step):
            return ps_pb2.PUSH_STATUS_JOB_DONE
        budget = self.config.step_budget
        if self.mode == common_pb2.CONSISTENCY_SYNC and budget and step >= budget:
            return ps_pb2.PUSH_STATUS_JOB_DONE  # known in advance: no shard passes the budget
        fenced = self._departed.get(worker_id, 0)
        if incarnation < self._incarnations.get(worker_id, 0) or (
                worker_id not in self._workers and 0 < incarnation <= fenced):
            raise FencedError(f"{refusals.FENCED} this worker incarnation was declared dead; "
                              "register again")
        if worker_id not in self._workers:
            raise UnknownWorkerError("worker is not a live worker of this job")
        if step <= self._highest.get((worker_id, incarnation), -1):
            return ps_pb2.PUSH_STATUS_DUPLICATE
        if self.mode == common_pb2.CONSISTENCY_SYNC:
            if step < self.version:
                return ps_pb2.PUSH_STATUS_STALE
            if step > self.version:
                raise StepAheadError(f"{refusals.STEP_AHEAD} step {step} is ahead of the open "
                                     f"round {self.version}")
            if worker_id in self._round:  # a new incarnation re-pushing the same step
                return ps_pb2.PUSH_STATUS_DUPLICATE
        return None

    # -- sync rounds (caller holds the lock) ----------------------------------------------

    def _holds(self, worker_id: str, step: int) -> bool:
        """A push a frozen sync shard keeps (see set_job_state): into the open round while
        the final version is not named."""
        return (self.mode == common_pb2.CONSISTENCY_SYNC and self.final_version is None
                and step == self.version and worker_id in self._workers
                and worker_id not in self._round)

    def _round_complete(self) -> bool:
        return bool(self._round) and all(w in self._round for w in self._workers)

    def _close_round(self) -> float | None:
        """Runs the open round's Adam step with the live workers' contributions.

        Contributions of workers that are no longer live are dropped. A round that closes
        with fewer contributions than it had live workers when it opened (a worker left
        mid-round) counts as short and is logged. Returns the seconds spent, or None if no
        live contribution was left (the round stays open).
        """
        parts = [self._round.pop(w) for w in self._workers if w in self._round]
        self._drop_round()
        if not parts:
            return None
        if len(parts) < self._round_opened_with:
            self.short_rounds += 1
            log.warning("job %s shard %d: round %d completed with %d of the %d workers it "
                        "opened with", self.job_id, self.index, self.version, len(parts),
                        self._round_opened_with)
        start = time.perf_counter()
        # Workers with no samples this step push weight 0; leave them out of the sum. If
        # nobody had samples, the round still closes (plain mean) so the barrier moves on.
        weighted = [p for p in parts if p.batch_size > 0] or parts
        terms: list[tuple[torch.Tensor, float | None]]
        if len(weighted) == 1:
            terms = [(weighted[0].grad, None)]  # used as is, so one worker matches torch bitwise
        else:
            total = sum(p.batch_size for p in weighted)
            share = [p.batch_size / total if total else 1 / len(weighted) for p in weighted]
            terms = [(p.grad, w) for p, w in zip(weighted, share, strict=True)]
        self._step(terms)
        self.pushes_applied += len(parts)
        self._applied()
        for part in parts:
            self._staging.release(part.grad)
        self._cond.notify_all()
        return time.perf_counter() - start

    def _drop_round(self) -> None:
        for part in self._round.values():
            self._staging.release(part.grad)
        self._round.clear()

    def _step(self, terms: list[tuple[torch.Tensor, float | None]]) -> float:
        """One Adam step with the scheduled lr; version += 1. Caller holds the lock.

        The step's gradient is sum(g * w) over `terms` in rank order, or its one gradient as is
        when that weight is None. A single fp32 gradient is stepped in one kernel call. Any
        other (a round's mean, a gradient kept in its wire dtype) is formed block by block in
        a small fp32 scratch, each block stepped while in cache: no full-size temporary, and
        per element the same arithmetic as whole-vector ops (bitwise: test_ps_adam.py).
        """
        start = time.perf_counter()
        self._detach_readers()
        self._group["lr"] = schedule.learning_rate(self.config.optimizer, self.adam_step)
        first, weight = terms[0]
        if isinstance(self._optimizer, adam_lib.FusedAdam) and (
                len(terms) > 1 or weight is not None or first.dtype != torch.float32):
            state = self._optimizer.begin()
            if self._block is None:
                self._block = torch.empty(min(self.length, adam_lib.BLOCK_ELEMENTS))
            for lo in range(0, self.length, adam_lib.BLOCK_ELEMENTS):
                hi = min(lo + adam_lib.BLOCK_ELEMENTS, self.length)
                block = self._block[: hi - lo].copy_(first[lo:hi])
                if weight is not None:
                    block.mul_(weight)
                for grad, w in terms[1:]:
                    block.add_(grad[lo:hi], alpha=w)
                self._optimizer.apply(state, lo, block)
        else:  # one fp32 gradient, or torch.optim without fused kernels: whole-vector ops
            grad = first if first.dtype == torch.float32 else first.float()
            if weight is not None:
                grad.mul_(weight)
            for other, w in terms[1:]:
                grad.add_(other, alpha=w)
            self._weights.grad = grad
            try:
                self._optimizer.step()
            finally:
                self._weights.grad = None
        self.adam_step += 1
        self.version += 1
        return time.perf_counter() - start

    # -- pull ---------------------------------------------------------------------------

    def _min_clock(self) -> int | None:
        return min((self._clocks.get(w, 0) for w in self._workers), default=None)

    def _clock_ok(self, clock: float) -> bool:
        if self.mode != common_pb2.CONSISTENCY_SSP:
            return True
        lowest = self._min_clock()
        return lowest is None or lowest >= clock - self.staleness

    def wait_for_pull(self, min_version: int, clock: float, timeout: float,
                      cancelled: Callable[[], bool] | None = None) -> bool:
        """Waits up to `timeout` s until version >= min_version and (ssp) the clock gate opens.

        Returns whether both hold. Returns early (False unless they hold) when the job is
        frozen or the shard closed, since nothing will change any more, or when `cancelled()`
        turns true after a `wake()`.
        """
        def reached() -> bool:
            return self.version >= min_version and self._clock_ok(clock)

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
            if self.mode == common_pb2.CONSISTENCY_SSP and math.isfinite(clock):
                lowest = self._min_clock()
                if lowest is not None and clock - lowest > self.max_clock_spread:
                    self.max_clock_spread = int(clock - lowest)
            return True

    def wake(self) -> None:
        """Makes waiting pulls re-check their `cancelled` callbacks."""
        with self._cond:
            self._cond.notify_all()

    def wait_for_version(self, min_version: int, timeout: float) -> bool:
        """Waits up to `timeout` s for version >= min_version; returns whether reached."""
        return self.wait_for_pull(min_version, -math.inf, timeout)

    def wait_for_clock(self, clock: int, timeout: float) -> bool:
        """ssp: waits up to `timeout` s until every live worker's clock >= clock - staleness."""
        return self.wait_for_pull(0, clock, timeout)

    def snapshot(self, dtype: torch.dtype = torch.float32) -> Snapshot:
        """The current version of the weights in `dtype`; give it back with `release`.

        Pulls of the same version and dtype share one entry, which is never written while
        anyone holds it.
        """
        with self._cond:
            if self._closed:
                raise ShardClosedError("shard was dropped or replaced")
            entry = self._copies.get(dtype)
            if entry is None or entry.version != self.version:
                if entry is not None and entry.refs == 0 and entry.tensor is not None:
                    self._staging.release(entry.tensor)
                entry = _CachedCopy(self.version, dtype)
                self._copies[dtype] = entry
            entry.refs += 1
            return Snapshot(entry.version, self.frozen, dtype, entry, self)

    def read(self, snapshot: Snapshot, start: int, end: int,
             fn: Callable[[torch.Tensor], _T]) -> _T:
        """Returns fn(view of elements [start, end) of the snapshot), called under the lock.

        The view is fp32 (the live weights) or the snapshot's dtype (its copy); fn must not
        keep it. Building a pull message from it is the one copy a pull makes.
        """
        with self._cond:
            entry = snapshot._entry
            source = entry.tensor if entry.tensor is not None else self._weights
            return fn(source[start:end])

    def _materialize(self, entry: _CachedCopy) -> torch.Tensor:
        with self._cond:
            if entry.tensor is None:  # still the live weights (a step would have copied them)
                entry.tensor = self._staging.acquire(entry.dtype)
                entry.tensor.copy_(self._weights)
            return entry.tensor

    def _detach_readers(self) -> None:
        """Before the weights change (caller holds the lock): snapshots still reading them in
        place get their own copy."""
        for entry in self._copies.values():
            if entry.tensor is None and entry.refs > 0:
                entry.tensor = self._staging.acquire(entry.dtype)
                entry.tensor.copy_(self._weights)

    def release(self, snapshot: Snapshot) -> None:
        """Hands back a snapshot; its tensor must not be used afterwards."""
        with self._cond:
            entry = snapshot._entry
            entry.refs -= 1
            if (entry.refs == 0 and entry.tensor is not None
                    and self._copies.get(entry.dtype) is not entry):
                self._staging.release(entry.tensor)


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
    if config.mode not in MODES:
        raise InvalidConfigError(f"unknown consistency mode {config.mode}")
    if config.staleness < 0:
        raise InvalidConfigError(f"staleness must be >= 0, got {config.staleness}")
    if len(set(config.workers)) != len(config.workers):
        raise InvalidConfigError("worker ids are not unique")
    schedule.validate(config.optimizer)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite.

    A sum is finite only if every term is (NaN and inf propagate), and costs a read of the
    tensor without allocating; the elementwise check runs only when the sum is not finite,
    to tell real non-finite values from an overflowing sum.
    """
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def unpushable(grad: torch.Tensor) -> InvalidPushError:
    """Why a gradient that is not codec.pushable is refused: non-finite values, or values so
    large that Adam's second moment (a mean of g*g, in fp32) would overflow to inf, after
    which those weights would never move again."""
    if not all_finite(grad):
        return InvalidPushError("gradient has non-finite values", "non_finite")
    return InvalidPushError(
        f"gradient has values beyond +-{codec.MAX_GRADIENT:.3g} (largest "
        f"{float(grad.abs().max()):.3g}): Adam's state would overflow", "too_large")


def _deep_clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _deep_clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_clone(v) for v in value]
    return value
