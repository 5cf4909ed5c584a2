"""Pull serving of one shard: waiting until the requested version exists (and, ssp, the clock
gate opens), and taking a copy-on-write snapshot of that version to read.

Pure core: no gRPC. Functions take the shard's `ShardCore` and take its condition themselves;
the wait never holds the lock while it sleeps (Condition.wait releases it) and never outlasts
its timeout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .core import ShardCore
from .snapshots import Snapshot


def wait_for_pull(core: ShardCore, min_version: int, clock: float, timeout: float,
                  cancelled: Callable[[], bool] | None = None) -> bool:
    """Waits up to `timeout` s until version >= min_version and (ssp) the clock gate opens.

    `clock` -inf waits for the version only. Returns whether both hold. Returns early (False
    unless they hold) when the job is frozen or the shard closed, since nothing will change
    any more, or when `cancelled()` turns true after a notify of the condition.
    """
    def reached() -> bool:
        return core.version >= min_version and core.gate.clock_ok(clock, core.workers)

    def done() -> bool:
        return (reached() or core.frozen or core.closed
                or (cancelled is not None and cancelled()))

    with core.cond:
        core.waiting_pulls += 1
        try:
            core.cond.wait_for(done, max(0.0, timeout))
        finally:
            core.waiting_pulls -= 1
        if not reached():
            return False
        if math.isfinite(clock):
            core.gate.granted(clock, core.workers)
        return True


def snapshot(core: ShardCore, dtype: torch.dtype) -> Snapshot:
    """The current version of the weights in `dtype` (see Shard.snapshot).

    Raises:
        ShardClosedError: the shard was dropped or replaced.
    """
    with core.cond:
        core.check_open()
        return core.snapshots.take_locked(core.version, core.frozen, dtype)
