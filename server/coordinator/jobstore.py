"""The job table's indexes (every job, the active ones, the settling ones, the workers
awaited after a restore) and the one move between them: a job's end.

Pure: no gRPC, no clock of its own. Not thread-safe: a JobStore belongs to one JobTable, and
every function that reads or changes it runs under the lock of the table's owner (the
servicer's lock).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from shardps.proto import common_pb2, names
from shardps.proto.states import state_name

from . import endings
from .convergence import Verdict
from .job import Job, UnknownJobError
from .rereplication import Joins

log = logging.getLogger(__name__)


@dataclass
class JobStore:
    """Every job the coordinator knows, indexed.

    Attributes:
        all: every job by id, in submit order.
        active: the non-final ones.
        settling: ended jobs whose late step reports still count.
        awaiting: workers alive in a restored state that have not been heard from since: their
            jobs take no new workers until they are back or lost (docs: "A full stop").
        joins: when each joining copy of a replicated shard was added (rereplication.py).
    """

    all: dict[str, Job] = field(default_factory=dict)
    active: dict[str, Job] = field(default_factory=dict)
    settling: dict[str, Job] = field(default_factory=dict)
    awaiting: set[str] = field(default_factory=set)
    joins: Joins = field(default_factory=Joins)

    def load(self, jobs: list[Job]) -> None:
        """Takes over saved jobs in submit order (coordinator restart); the store must be
        empty."""
        assert not self.all, "load into an empty JobStore"
        self.all = {j.job_id: j for j in jobs}
        self.active = {j.job_id: j for j in jobs if not j.final}
        self.settling = {j.job_id: j for j in jobs if j.ending.settle_by is not None}
        self.awaiting = {w for j in self.active.values() for w in j.workers}

    def add(self, job: Job) -> None:
        """A newly submitted job (its id is new)."""
        self.all[job.job_id] = self.active[job.job_id] = job

    def get(self, job_id: str) -> Job:
        """Raises UnknownJobError for an id never submitted."""
        job = self.all.get(job_id)
        if job is None:
            raise UnknownJobError(f"unknown job {names.shown(job_id)}")
        return job

    def busy_workers(self) -> set[str]:
        """Workers that are live members of a non-final job."""
        return {w for j in self.active.values() for w in j.workers}

    def hosted(self, node_id: str) -> int:
        """How many non-final jobs this server is assigned to (its load for scheduling)."""
        return sum(node_id in j.servers for j in self.active.values())

    def end(self, job: Job, verdict: Verdict, now: float, version: int | None = None) -> common_pb2.JobState:
        """Ends a job with `verdict`; `version` is the version the step that decided it
        names (sync: the final weights are there), None if no step did. Returns the state."""
        # Final states never change: the first verdict wins.
        if job.final:
            return job.state
        job.state, job.reason, job.ended = verdict.state, verdict.reason, now
        endings.begin(job.ending, job.sync, version, now)
        if job.ending.last_step is not None:
            job.history.discard_after(job.ending.last_step)
        job.history.settle(job.workers)
        if job.history.open_steps:  # reports of a rank that has not heard yet still count
            self.settling[job.job_id] = job
        else:
            job.ending.settle_by = None
        del self.active[job.job_id]
        final = job.ending.final_version
        log.info("job %s ended %s: %s%s", job.job_id, state_name(job.state), job.reason,
                 f" (final version {final})" if final >= 0 else "")
        return job.state

    def settled(self, job: Job) -> None:
        """An ended job's history is complete: its open loss points are written, and no late
        report counts any more."""
        job.history.flush()
        job.ending.settle_by = None
        self.settling.pop(job.job_id, None)
