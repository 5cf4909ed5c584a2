"""Checkpoint capture: what of a shard's tables a checkpoint holds, and forced captures that
wait for a version (the Checkpoint RPC's `at_version`).

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

from .checkpoint import ShardState


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
