"""What the coordinator's job views do to one shard: the job's state (freezing at its end,
settling at the named final version) and its live worker set (a shrinking set may complete
an open sync round). docs/architecture.md, "Job life cycle" 8.

Pure core: no gRPC. Functions take the shard's `ShardCore` and take its condition themselves;
they log outside it.
"""

from __future__ import annotations

import logging

from shardps.proto import common_pb2
from shardps.proto.states import FINAL_STATES

from .core import ShardCore

log = logging.getLogger("shardps.ps")


def set_job_state(core: ShardCore, state: common_pb2.JobState, final_version: int | None = None) -> bool:
    """Records the coordinator's view of the job; returns True if this call froze the shard.

    A final state is sticky: later states are ignored. Freezing wakes every waiting pull
    (they answer job_done) and refuses pushes from then on (JOB_DONE). async and ssp drop
    their pushes in flight. sync, until the job's `final_version` is named, holds the open
    round: a push into it is kept (and still answered JOB_DONE), never applied, so that once
    named a shard one round behind the others can close that round with the same pushes they
    applied; a round past the final version is dropped.
    """
    with core.cond:
        if state == common_pb2.JOB_STATE_UNSPECIFIED or core.settled:
            return False
        froze = not core.frozen and state in FINAL_STATES
        if not core.frozen:
            core.job_state = state
            if not froze:
                return False
            if not core.gate.sync:
                core.gate.drop_round()
            core.cond.notify_all()
        naming = core.config.mode == common_pb2.CONSISTENCY_SYNC and final_version is not None
        if not froze and not naming:
            return False  # still waiting for the final version to be named
        if final_version is not None and naming:
            _settle_locked(core, final_version)
        version, final = core.version, core.final_version
    log.info("%s %s at version %d (%s)%s", core.name, "frozen" if froze else "settled",
             version, common_pb2.JobState.Name(state),
             "" if final is None else f"; the job's final version is {final}")
    if final is not None and version != final:
        log.error("%s is at version %d, not the job's final version %d: its weights are not "
                  "the job's final weights (export refuses them)", core.name, version, final)
    return froze


def _settle_locked(core: ShardCore, final_version: int) -> None:
    """sync: the final version is named; close the held round if it leads there."""
    if core.version == final_version - 1 and core.gate.complete(core.workers):
        core.close_round()
    core.gate.drop_round()
    core.final_version = final_version
    core.cond.notify_all()


def update_workers(core: ShardCore, workers: list[str], epoch: int) -> bool:
    """Adopts the job's live workers (rank order) of membership `epoch`.

    Views older than the current epoch are ignored. If the live set shrank so that an open
    sync round now has every remaining contribution, the round completes here. Returns True
    if it did.
    """
    with core.cond:
        if epoch < core.epoch or core.closed:
            return False
        changed = workers != core.workers
        core.epoch = epoch
        if not changed:
            return False
        core.workers = list(workers)
        core.staging.keep = max(2, len(workers))
        completed = False
        if core.gate.sync and not core.frozen:
            completed = core.gate.complete(core.workers) and core.close_round() is not None
        core.cond.notify_all()  # ssp: the slowest worker may have left
        version = core.version
    log.info("%s: workers %s (epoch %d)%s", core.name, ",".join(workers) or "-", epoch,
             f"; round completed with the remaining workers, version {version}"
             if completed else "")
    return completed
