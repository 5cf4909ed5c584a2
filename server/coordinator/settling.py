"""After a job's end: step reports that still count, servers' frozen shards that name a sync
job's final version, and the deadline after which the history is settled.

Pure: no gRPC, no clock of its own (`now` is monotonic seconds). Not thread-safe: called
through JobTable under its owner's lock. The rules (endings.py) are docs/architecture.md,
"Job life cycle" 8-9.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from . import endings
from .history import StepReport
from .job import Job
from .jobstore import JobStore
from .membership import Membership

log = logging.getLogger(__name__)


def late_steps(store: JobStore, job: Job, node_id: str, incarnation: int,
               membership: Membership, steps: Sequence[StepReport], now: float) -> None:
    """Step reports a worker of an ended job sent before it learned the verdict: those of
    steps whose gradients are in the final weights still go into its history."""
    if (job.job_id not in store.settling or node_id not in job.workers
            or not membership.current(node_id, incarnation)):
        return
    late = [s for s in steps if s.step >= 0 and s.samples >= 0 and math.isfinite(s.loss)
            and endings.counts(job.ending, s.step, now)]
    if late:
        job.history.record_steps(node_id, late, now)
        job.history.settle(job.workers)
        log.info("job %s: %d step report(s) of %s after the end recorded (up to step %d)",
                 job.job_id, len(late), node_id, late[-1].step)
    if not job.history.open_steps:
        store.settled(job)


def shards_frozen(store: JobStore, node_id: str,
                  reports: Sequence[tuple[str, int, int]]) -> list[Job]:
    """A server froze shards (job, index, version) of ended sync jobs whose final version is
    not named yet. Returns the jobs whose final version this names."""
    named = []
    for job_id, index, version in reports:
        job = store.all.get(job_id)
        if (job is None or not job.final or not job.sync or job.shard_map is None
                or not 0 <= index < len(job.shard_map.shards)
                or job.shard_map.shards[index].server_id != node_id):
            continue
        if endings.shard_frozen(job.ending, len(job.shard_map.shards), index, version):
            job.history.discard_after(job.ending.final_version - 1)
            log.info("job %s: final version %d (the shards froze at %s)", job_id,
                     job.ending.final_version,
                     ", ".join(str(v) for _, v in sorted(job.ending.frozen.items())))
            named.append(job)
    return named


def settle_due(store: JobStore, now: float) -> None:
    """Settles every ended job whose late reports no longer count."""
    for job in list(store.settling.values()):
        if job.ending.settle_by is None or now > job.ending.settle_by:
            store.settled(job)
