"""Progress reports and the verdicts they bring: a worker's steps and evaluations go into
the job's history, and a non-finite loss, a worker's failure, the stop condition or the end
of training ends the job.

Pure: no gRPC, no clock of its own (`now` is monotonic seconds). Not thread-safe: called
through JobTable under its owner's lock. The rules are docs/architecture.md, "Job life cycle"
5-8.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from shardps.proto import common_pb2
from shardps.proto.spec import METRICS

from . import settling
from .convergence import Verdict, non_finite_loss
from .history import Evaluation, StepReport
from .job import COMPLETED, FAILED, RUNNING, Job, JobStateError, finished_reason
from .jobstore import JobStore
from .membership import Membership
from .recovery import progress_reported

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """One ReportProgress call, as the core sees it.

    Attributes:
        steps: training steps, in order.
        evals: evaluations on the held-out split.
        finished: the worker has finished training (rank 0: after its final evaluation).
        failure: why the worker failed ("" if it did not).
        rollback_id: the latest rollback the worker has taken.
    """

    steps: Sequence[StepReport] = ()
    evals: Sequence[Evaluation] = ()
    finished: bool = False
    failure: str = ""
    rollback_id: int = 0


def report_progress(store: JobStore, job: Job, node_id: str, incarnation: int,
                    membership: Membership, now: float, report: Report) -> common_pb2.JobState:
    """Records a worker's report and decides the job's fate; returns the state
    (JobTable.report_progress says the rules and what it raises)."""
    if job.final:
        settling.late_steps(store, job, node_id, incarnation, membership, report.steps, now)
        return job.state
    membership.require(node_id, incarnation)
    if node_id not in job.workers:
        raise JobStateError(f"node {node_id} is not a live worker of job {job.job_id}")
    if job.state != RUNNING:
        # A worker that cannot even set up (model, dataset, layout) fails the job at once
        # rather than leaving it to the initialisation timeout.
        if report.failure:
            return store.end(job, _failed(node_id, report.failure), now)
        raise JobStateError(f"job {job.job_id} is not running yet ({job.reason}); "
                            "report progress after ActivateJob")
    _check(report)
    non_finite, bad_step = _record_steps(job, node_id, report, now)
    if non_finite:
        return store.end(job, Verdict(FAILED, non_finite), now, version=bad_step)
    if report.failure:
        return store.end(job, _failed(node_id, report.failure), now)
    for e in report.evals:
        job.history.record_eval(e)
        if verdict := job.tracker.observe(e.step, e.metric, e.value):
            # sync: rank 0 evaluated version e.step before pushing that step
            return store.end(job, verdict, now, version=e.step)
    if report.finished:
        return _finished(store, job, node_id, report.evals, now)
    return job.state


def _check(report: Report) -> None:
    """Raises ValueError (nothing recorded) for a negative step or sample count or an
    unknown metric."""
    for s in report.steps:
        if s.step < 0 or s.samples < 0:
            raise ValueError(f"steps: step {s.step} with {s.samples} samples; "
                             "neither may be negative")
    for e in report.evals:
        if e.step < 0 or e.metric not in METRICS:
            raise ValueError(f"evals: step {e.step}, metric {e.metric!r}; the step may "
                             f"not be negative and the metric is one of {', '.join(METRICS)}")


def _record_steps(job: Job, node_id: str, report: Report,
                  now: float) -> tuple[str | None, int | None]:
    """Records the steps up to the first non-finite loss. Returns why that loss fails the
    job and its step (None, None if every loss is finite)."""
    finite, reason, bad_step = [], None, None
    for s in report.steps:
        if reason := non_finite_loss(s.step, s.loss, node_id):
            bad_step = s.step  # not pushed: the weights end at that version (sync)
            break
        finite.append(s)
    job.history.record_steps(node_id, finite, now)
    if progress_reported(job.rollback, report.rollback_id, [s.step for s in finite]):
        log.info("job %s: rollback %d settled: every shard is past version %d", job.job_id,
                 job.rollback.id, job.rollback.version)
    job.history.settle(job.workers)
    return reason, bad_step


def _finished(store: JobStore, job: Job, node_id: str, evals: Sequence[Evaluation],
              now: float) -> common_pb2.JobState:
    """A worker finished training: from rank 0, or from the last live worker still
    training, that completes the job."""
    job.history.worker(node_id).finished = True
    if job.rank(node_id) != 0 and not job.all_finished():
        return job.state
    # Rank 0 evaluated the final version (its evaluation's step) before reporting.
    final = max((e.step for e in evals), default=None) if job.rank(node_id) == 0 else None
    return store.end(job, Verdict(COMPLETED, finished_reason(job.spec)), now, version=final)


def _failed(node_id: str, failure: str) -> Verdict:
    return Verdict(FAILED, f"worker {node_id} failed: {failure}")
