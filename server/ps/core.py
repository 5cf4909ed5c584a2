"""The state one shard's concerns share, under the shard's one condition, and the version step
every concern that changes the weights goes through (a push, a round completed by a shrinking
worker set, a held round closed when the job's final version is named).

Pure core: no gRPC. shard.py (the façade), pushes.py, pulls.py, ending.py and capture.py work
on a `ShardCore`; the parts it holds each keep one concern: `gate` (sync rounds, ssp clocks),
`fencing` (incarnations, dedup), `updater` (the Adam step), `snapshots` (copy-on-write reads)
and `captures` (forced checkpoint captures).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.proto.states import FINAL_STATES

from . import schedule
from .buffers import BufferPool
from .capture import ForcedCaptures, capture_locked
from .errors import ShardClosedError
from .fencing import Fencing
from .gate import Gate, round_terms
from .pull_deltas import ShardMirrors
from .snapshots import SnapshotCache
from .tables import Member, ShardTables
from .updater import Terms, Updater


class ShardCore:
    """The mutable state of one shard.

    Thread-safety: `cond` (and its lock) guards every attribute and every part; every method
    here, and every function of the concern modules that takes a core and is named
    `..._locked`, expects the caller to hold it. Ownership: the core owns the weights and Adam
    state (in `updater`) and the staging buffers (`staging`); `config` is the shard's and
    never changes.

    Attributes:
        version: updates applied (sync: rounds closed); 0 = the initial weights.
        adam_step: Adam steps taken (equals version except after a resume or rollback).
        pushes_applied: pushes that went into a step.
        job_state: the coordinator's view of the job; final states are sticky.
        final_version: sync, once the job has ended: the version the coordinator named for
            its final weights (None until named; the open round is held meanwhile).
        epoch: the membership epoch of `workers`.
        rollback_id: sync, the last rollback applied.
        workers: the live workers, rank order.
        closed: dropped or replaced; no call succeeds any more.
        waiting_pulls: pulls blocked in pulls.wait_for_pull right now.
        on_applied: called under the lock after every version change, with whether a forced
            capture was just taken there; it must not block.
        on_rows_set: called under the lock after InitRows set a table's rows (version 0);
            it must not block.
    """

    def __init__(self, config: ps_pb2.ShardConfig, weights: torch.Tensor):
        """Version 0 from a validated config and initial weights (taken over, not copied)."""
        self.cond = threading.Condition(threading.Lock())
        self.config = config
        self.name = f"job {config.job_id} shard {config.shard_index}"
        self.version = self.adam_step = self.pushes_applied = 0
        self.job_state: common_pb2.JobState = common_pb2.JOB_STATE_RUNNING
        self.final_version: int | None = None
        self.epoch = config.epoch
        self.rollback_id = 0
        self.workers: list[str] = list(config.workers)
        self.closed = False
        self.waiting_pulls = 0
        self.staging = BufferPool(config.length, keep=max(2, len(self.workers)))
        self.updater = Updater(config.optimizer, weights)
        self.gate = Gate(config.mode, config.staleness, self.name, self.staging.release)
        self.fencing = Fencing()
        self.snapshots = SnapshotCache(self.cond, self.updater.weights, self.staging)
        self.captures = ForcedCaptures(self.cond)
        self.on_applied: Callable[[bool], None] | None = None
        self.on_rows_set: Callable[[], None] | None = None
        self.tables = ShardTables(config)  # the job's embedding tables (tables.py)
        # Compressed pulls' mirrors of the workers' copies.
        self.mirrors = ShardMirrors(config.mode == common_pb2.CONSISTENCY_SYNC)

    @property
    def frozen(self) -> bool:
        """The job has reached a final state: pushes answer JOB_DONE, weights never change."""
        return self.job_state in FINAL_STATES

    @property
    def settled(self) -> bool:
        """Frozen with its final weights fixed: sync once the final version is named (and
        reached if it can be), other modes as soon as frozen."""
        return self.frozen and (self.config.mode != common_pb2.CONSISTENCY_SYNC
                                or self.final_version is not None)

    def check_open(self) -> None:
        """Raises ShardClosedError once the shard was dropped or replaced."""
        if self.closed:
            raise ShardClosedError("shard was dropped or replaced")

    def close_round(self) -> float | None:
        """Steps on the open sync round's live contributions; None if none was left (it stays
        open). Returns the seconds spent, the mean and the bookkeeping included."""
        members = [Member(w, self.gate.round[w].batch_size) for w in self.workers
                   if w in self.gate.round]
        parts = self.gate.take_round(self.workers, self.version)
        if not parts:
            return None
        start = time.perf_counter()
        if self.tables:
            self.tables.close_round_locked(self.version, members)
        self.step(round_terms(parts))
        self.applied(len(parts))
        for part in parts:
            self.staging.release(part.grad)
        return time.perf_counter() - start

    def step(self, terms: Terms) -> float:
        """One Adam step with the scheduled lr; version += 1. Returns the seconds spent."""
        start = time.perf_counter()
        self.snapshots.detach_readers_locked()
        self.updater.step(terms, schedule.learning_rate(self.config.optimizer, self.adam_step))
        self.adam_step += 1
        self.version += 1
        return time.perf_counter() - start

    def applied(self, pushes: int) -> None:
        """After a step: counts its pushes, fills forced captures waiting for this version,
        tells the checkpoint side, wakes waiting pulls."""
        self.pushes_applied += pushes
        forced = self.captures.fulfil_locked(self.version, lambda: capture_locked(self))
        if self.on_applied is not None:
            self.on_applied(forced)
        self.cond.notify_all()
