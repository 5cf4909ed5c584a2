"""Checkpoint capture: what of a shard a checkpoint holds (`capture_locked`), forced captures
that wait for a version (the Checkpoint RPC's `at_version`), and loading a checkpoint back
into a live shard (`load_state`: rollback, resume).

A forced capture is a `CaptureRequest` registered under the shard's condition; the push path
fulfils it, under the same condition, right after the version it waits for is applied, so the
state is exactly that version's. The waiter removes its own request under the condition,
whether it was fulfilled or timed out: nothing else ever removes it, so a timeout racing a
push cannot lose or double-handle it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .checkpoint import ShardState

if TYPE_CHECKING:
    from .core import ShardCore  # core.py imports this module


def without_open_round(applied: dict[tuple[str, int], int], clocks: dict[str, int],
                       round_workers: Iterable[str],
                       version: int) -> tuple[dict[tuple[str, int], int], dict[str, int]]:
    """Copies of the applied-push and clock tables as they were before the open sync round.

    A round still open is not part of a checkpoint: its contributions are not applied, so
    their pushes are not recorded as applied either (the workers push them again).
    """
    applied, clocks = dict(applied), dict(clocks)
    for worker in round_workers:
        for key, step in applied.items():
            if key[0] == worker and step >= version:
                applied[key] = version - 1
        clocks[worker] = min(clocks.get(worker, 0), version)
    return applied, clocks


class CaptureRequest:
    """A forced capture waiting for the shard to reach `at_version`.

    `state` is set once, by the push path or by the waiter when it gives up; `copy_seconds` is
    how long the copy held the shard's lock.
    """

    def __init__(self, at_version: int):
        self.at_version = at_version
        self.state: ShardState | None = None
        self.copy_seconds = 0.0

    def fill(self, capture: Callable[[], ShardState]) -> None:
        start = time.perf_counter()
        self.state = capture()
        self.copy_seconds = time.perf_counter() - start


class ForcedCaptures:
    """The forced captures pending on one shard.

    Thread-safety: the shard's condition (passed in) guards the pending list. `fulfil_locked`
    runs on a push thread that holds it; `wait` takes it on the caller's thread.
    """

    def __init__(self, cond: threading.Condition):
        self._cond = cond
        self._pending: list[CaptureRequest] = []

    def fulfil_locked(self, version: int, capture: Callable[[], ShardState]) -> bool:
        """After a version change: fills every request that waits for `version` or an older
        one, with one capture (the caller then notifies the condition). Returns whether it
        captured."""
        if not self._pending:
            return False
        due = [r for r in self._pending if r.state is None and version >= r.at_version]
        if not due:
            return False
        due[0].fill(capture)
        for request in due[1:]:
            request.state, request.copy_seconds = due[0].state, 0.0
        return True

    def wait(self, at_version: int, may_reach: Callable[[], bool], gone: Callable[[], bool],
             capture: Callable[[], ShardState], timeout: float) -> CaptureRequest:
        """Waits up to `timeout` s for a capture at `at_version`.

        `may_reach()`, read under the condition first: the shard is below `at_version` and may
        still get there; `gone()`: the shard was dropped, nothing will change any more. If it
        may not reach the version, or the wait ends without it, the current state is captured
        instead, under the same hold of the lock. The request comes back filled.
        """
        with self._cond:
            request = CaptureRequest(at_version)
            if may_reach():
                self._pending.append(request)
                try:
                    self._cond.wait_for(lambda: request.state is not None or gone(),
                                        max(0.0, timeout))
                finally:
                    self._pending.remove(request)
            if request.state is None:
                request.fill(capture)
            return request


def capture_locked(core: ShardCore) -> ShardState:
    """A consistent copy of everything a checkpoint holds; the caller holds `core.cond`.

    A sync round still open is not part of the state (see without_open_round). A sync
    shard's state has the pull mirror its workers hold, if they pull compressed.
    """
    fencing, gate = core.fencing, core.gate
    applied, clocks = without_open_round(fencing.applied, gate.clocks, gate.round, core.version)
    tables, table_applied = core.tables.capture_locked()
    return ShardState(
        config=core.config, version=core.version, adam_step=core.adam_step,
        pushes_applied=core.pushes_applied, job_state=core.job_state, epoch=core.epoch,
        workers=list(core.workers), tensors=core.updater.copy_tensors(),
        incarnations=dict(fencing.incarnations), departed=dict(fencing.departed),
        clocks=clocks, applied=applied, rollback_id=core.rollback_id, tables=tables,
        table_applied=table_applied,
        mirror=core.mirrors.saved_locked(core.workers, core.version, core.config.length))


def capture_at(core: ShardCore, at_version: int, timeout: float) -> tuple[ShardState, float]:
    """A capture at exactly `at_version`, waiting up to `timeout` s for a push to reach it;
    the current state if it is reached already, the job was frozen when asked, or the wait
    times out. Returns the state and the seconds its copy held the lock. Takes `core.cond`."""
    # A freeze during the wait does not end it: a sync round held at the freeze may still
    # close when the final version is named.
    request = core.captures.wait(at_version,
                                 lambda: core.version < at_version and not core.frozen,
                                 lambda: core.closed, lambda: capture_locked(core), timeout)
    assert request.state is not None  # wait() always fills it
    return request.state, request.copy_seconds


def load_state(core: ShardCore, state: ShardState, membership: bool = True) -> None:
    """Replaces weights, Adam state, embedding tables and version with a checkpoint's. Takes
    `core.cond`.

    `membership` also takes its workers, epoch, clocks and applied-push and fencing tables,
    the rows' applied-push table included (False for a resumed job, which starts them
    afresh). An open sync round is dropped, its buffered row gradients with it; waiting
    pulls re-check. The pull mirrors are dropped, and the checkpoint's seeded (with
    `membership`: a resumed job's workers start from the weights). The job state stays the
    coordinator's.

    Raises:
        InvalidConfigError: the checkpoint is of a different length, or its tables are not
            the shard's. Nothing has changed then.
    """
    with core.cond:
        core.updater.check(state.tensors)
        core.tables.check_states(state.tables)
        core.snapshots.detach_readers_locked()
        core.updater.load(state.tensors)
        core.tables.load_locked(state.tables, state.table_applied if membership else {})
        core.version, core.adam_step = state.version, state.adam_step
        core.pushes_applied = state.pushes_applied
        core.rollback_id = state.rollback_id
        if membership:
            core.epoch = state.epoch
            core.workers = list(state.workers)
            core.fencing.load(state.incarnations, state.departed, state.applied)
            core.gate.clocks = dict(state.clocks)
        core.gate.drop_round()
        core.snapshots.clear_locked()
        core.mirrors.restore_locked(state.mirror if membership else None)
        core.cond.notify_all()
