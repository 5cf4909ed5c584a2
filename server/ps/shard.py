"""One job's shard: fp32 weights under Adam, behind its consistency gate.

Pure core: no gRPC. The servicer decodes bytes into a staging tensor from `staging()`, then
calls `push`; pulls wait with `wait_for_pull` and read a consistent `snapshot`. `Shard` is the
façade the servicer, data plane, registry and checkpointer call; its state is a `ShardCore`
(core.py) under one condition, and each concern is a module over it: pushes.py (admission and
the push), pulls.py (waits and snapshots), ending.py (job state and live workers) and
capture.py (checkpoint captures and loads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from shardps.proto import common_pb2, ps_pb2

from . import ending, preconditioned, pulls, pushes, rows
from .capture import capture_at, capture_locked, load_state
from .checkpoint import ShardState
from .core import ShardCore
from .pushes import PushResult
from .shard_config import check_initial_weights, validate_config
from .snapshots import Snapshot

_T = TypeVar("_T")
OnApplied = Callable[["Shard", bool], None]


class Shard:
    """A contiguous range [offset, offset + length) of one job's flat fp32 vector.

    Thread-safety: every method may be called from any thread. One condition variable (and its
    lock, the core's) guards all state, its parts' included; Adam runs under it, so a snapshot
    never sees half an update. Waits always take a timeout. Ownership: the shard owns its
    weights and optimizer state; a gradient passed to `push` becomes the shard's (it may be
    buffered or reused).

    Attributes:
        restored: built by `from_state` from a checkpoint (server restart), not by InitShard.
    """

    def __init__(self, config: ps_pb2.ShardConfig, weights: torch.Tensor):
        """Creates version 0 from the initial weights (taken over, not copied).

        Raises:
            InvalidConfigError: bad config, or weights not a finite fp32 vector of `length`.
        """
        validate_config(config)
        check_initial_weights(weights, config.length)
        self.config = ps_pb2.ShardConfig()
        self.config.CopyFrom(config)
        self.job_id, self.index, self.length = config.job_id, config.shard_index, config.length
        self.mode = config.mode
        self.restored = False
        self._core = ShardCore(self.config, weights)
        self.rows = rows.ShardRows(self._core)  # the embedding tables' row calls
        self.mirrors = self._core.mirrors  # compressed pulls' mirrors (pull_deltas.ShardMirrors)
        self._on_applied: OnApplied | None = None

    # -- state (read without the lock: each is one attribute, always consistent) ----------

    @property
    def version(self) -> int:
        return self._core.version

    @property
    def adam_step(self) -> int:
        return self._core.adam_step

    @property
    def pushes_applied(self) -> int:
        return self._core.pushes_applied

    @property
    def job_state(self) -> int:
        return self._core.job_state

    @property
    def final_version(self) -> int | None:
        """sync, once the job has ended: the version named for its final weights."""
        return self._core.final_version

    @property
    def epoch(self) -> int:
        return self._core.epoch

    @property
    def rollback_id(self) -> int:
        """sync: the last rollback applied (recovery.py sets it)."""
        return self._core.rollback_id

    @rollback_id.setter
    def rollback_id(self, value: int) -> None:
        with self._core.cond:
            self._core.rollback_id = value

    @property
    def frozen(self) -> bool:
        """The job has reached a final state: pushes answer JOB_DONE, weights never change."""
        return self._core.frozen

    @property
    def settled(self) -> bool:
        """Frozen with its final weights fixed (see ShardCore.settled)."""
        return self._core.settled

    @property
    def closed(self) -> bool:
        """Dropped or replaced: no call on it will succeed any more."""
        return self._core.closed

    @property
    def waiting_pulls(self) -> int:
        """Pulls blocked waiting for a version or clock right now."""
        return self._core.waiting_pulls

    @property
    def workers(self) -> list[str]:
        with self._core.cond:
            return list(self._core.workers)

    @property
    def on_applied(self) -> OnApplied | None:
        """hook(shard, forced capture taken) after each version change, under the lock; no blocking."""
        return self._on_applied

    @on_applied.setter
    def on_applied(self, hook: OnApplied | None) -> None:
        with self._core.cond:
            self._on_applied = hook
            self._core.on_applied = None if hook is None else lambda forced: hook(self, forced)

    def info(self) -> ps_pb2.ShardInfo:
        core = self._core
        with core.cond:
            return ps_pb2.ShardInfo(
                job_id=self.job_id, shard_index=self.index, offset=self.config.offset,
                length=self.length, version=core.version, adam_step=core.adam_step,
                state=core.job_state, pushes_applied=core.pushes_applied,
                worker_clocks=dict(core.gate.clocks), max_clock_spread=core.gate.max_clock_spread,
                short_rounds=core.gate.short_rounds, live_workers=core.workers, epoch=core.epoch,
                tables=self.config.tables, rollback_id=core.rollback_id)

    def preconditioner(self) -> torch.Tensor:
        """A copy of the frozen denominator of preconditioned pushes (preconditioned.of_core)."""
        return preconditioned.of_core(self._core)

    def resident_bytes(self) -> int:
        """Bytes of fp32 weights plus Adam's m and v (once the first step created them)."""
        return self._core.updater.resident_bytes()

    # -- the coordinator's views (ending.py) ------------------------------------------------

    def set_job_state(self, state: common_pb2.JobState, final_version: int | None = None) -> bool:
        """Records the job's state; True if this call froze the shard (ending.set_job_state)."""
        return ending.set_job_state(self._core, state, final_version)

    def update_workers(self, workers: list[str], epoch: int) -> bool:
        """Adopts the live workers of `epoch`; True if that completed a sync round
        (ending.update_workers)."""
        return ending.update_workers(self._core, workers, epoch)

    def fence(self, live: dict[str, int]) -> None:
        """Adopts the live workers' incarnations (worker -> incarnation): one that left the live
        set, or is live under a newer incarnation, has its old one fenced (pushes refused)."""
        with self._core.cond:
            self._core.fencing.adopt(live)

    def close(self) -> None:
        """Marks the shard dropped (or replaced): waits end, later calls raise ShardClosedError."""
        core = self._core
        with core.cond:
            core.closed = True
            core.gate.drop_round()
            core.snapshots.clear_locked()
            core.staging.clear()
            core.cond.notify_all()

    # -- checkpoints (capture.py) -----------------------------------------------------------

    def capture(self) -> ShardState:
        """A consistent copy of everything a checkpoint holds (copies under the lock)."""
        with self._core.cond:
            return capture_locked(self._core)

    def capture_between_rounds(self) -> ShardState | None:
        """As `capture`, but None while a sync round holds contributions (transfer.py)."""
        with self._core.cond:
            return None if self._core.gate.round else capture_locked(self._core)

    def capture_locked(self) -> ShardState:
        """As `capture`, for callers that hold the lock (the `on_applied` hook)."""
        return capture_locked(self._core)

    def capture_at(self, at_version: int, timeout: float) -> tuple[ShardState, float]:
        """A capture at exactly `at_version` if a push reaches it within `timeout` s, else the
        current state; and the seconds its copy held the lock (capture.capture_at)."""
        return capture_at(self._core, at_version, timeout)

    def load_state(self, state: ShardState, membership: bool = True) -> None:
        """Replaces weights, Adam state, embedding tables and version with a checkpoint's
        (capture.load_state)."""
        load_state(self._core, state, membership)

    @classmethod
    def from_state(cls, state: ShardState) -> Shard:
        """A shard as it was when `state` was captured (server restart)."""
        shard = cls(state.config, state.tensors["weights"].clone())
        shard.load_state(state)
        shard._core.job_state = state.job_state  # not yet shared with any other thread
        shard.restored = True
        return shard

    # -- push (pushes.py) -----------------------------------------------------------------

    def staging(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A buffer of `length` elements to decode a push into (contents undefined).

        `dtype` may be the push's wire dtype (bf16/fp16): the gradient is then kept as it came,
        in half the memory, and cast to fp32 block by block when it is applied. The caller
        passes it to `push` (which takes it over) or hands it back with `release_staging` if
        the push fails before that.
        """
        return self._core.staging.acquire(dtype)

    def release_staging(self, grad: torch.Tensor) -> None:
        self._core.staging.release(grad)

    def check_push(self, *, worker_id: str, incarnation: int = 0, step: int, length: int,
                   batch_size: int = 1) -> ps_pb2.PushStatus | None:
        """Checks a push header before its chunks are read.

        Returns the outcome if it is already decided (JOB_DONE, DUPLICATE, STALE; none of
        these can change back), else None. Raises the same errors as `push`.
        """
        with self._core.cond:
            return pushes.admit_locked(self._core, worker_id, incarnation, step, length,
                                       batch_size)

    def push(self, grad: torch.Tensor, *, worker_id: str, incarnation: int = 0, step: int,
             base_version: int = 0, batch_size: int = 1, checked: bool = False) -> PushResult:
        """Handles one worker's gradient for one step and takes `grad` over; the outcomes
        and what it raises are pushes.push's. Nothing changes when it raises."""
        return pushes.push(self._core, grad, worker_id, incarnation, step, base_version,
                           batch_size, checked)

    # -- pull (pulls.py) ------------------------------------------------------------------

    def wait_for_pull(self, min_version: int, clock: float, timeout: float,
                      cancelled: Callable[[], bool] | None = None) -> bool:
        """Waits up to `timeout` s for `min_version` and (ssp) the clock gate; whether both
        hold (pulls.wait_for_pull). `cancelled` is re-read after each `wake()`."""
        return pulls.wait_for_pull(self._core, min_version, clock, timeout, cancelled)

    def wake(self) -> None:
        """Makes waiting pulls re-check their `cancelled` callbacks."""
        with self._core.cond:
            self._core.cond.notify_all()

    def snapshot(self, dtype: torch.dtype = torch.float32) -> Snapshot:
        """The current version of the weights in `dtype`; give it back with `release`.

        Pulls of the same version and dtype share one entry, which is never written while
        anyone holds it.
        """
        return pulls.snapshot(self._core, dtype)

    def read(self, snapshot: Snapshot, start: int, end: int,
             fn: Callable[[torch.Tensor], _T]) -> _T:
        """Returns fn(view of elements [start, end) of the snapshot), called under the lock.

        The view is fp32 (the live weights) or the snapshot's dtype (its copy); fn must not
        keep it. Building a pull message from it is the one copy a pull makes.
        """
        return self._core.snapshots.read(snapshot, start, end, fn)

    def release(self, snapshot: Snapshot) -> None:
        """Hands back a snapshot; its tensor must not be used afterwards."""
        self._core.snapshots.release(snapshot)
