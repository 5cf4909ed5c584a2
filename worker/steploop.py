"""The step loop of one job on one worker (docs/architecture.md, "The training loop"): pull ->
forward/backward -> push until the step budget, then the finish (rank 0's final evaluation and
every rank's last report)."""

from __future__ import annotations

import logging
import math
import os
import time

from shardps.proto import coordinator_pb2, ps_pb2
from shardps.worker import batchsource, tasks
from shardps.worker.clipping import clip_grad_norm
from shardps.worker.decisions import eval_points, is_eval_step, pull_args, step_after_pull
from shardps.worker.evaluate import evaluate
from shardps.worker.jobcontext import JobContext
from shardps.worker.jobsetup import Prepared
from shardps.worker.outcome import End
from shardps.worker.shards import PULL_SLICE_S, JobShards, Rewind

logger = logging.getLogger(__name__)

# Fault injection for tests: ranks other than 0 wait this many ms before their last report
# at the step budget (so the job ends, on rank 0's report, before their last steps arrive).
LATE_FINISH_ENV = "SHARDPS_FAULT_LATE_FINISH_MS"


def _late_finish_s() -> float:
    return max(0, int(os.environ.get(LATE_FINISH_ENV, "0") or 0)) / 1000


class StepLoop:
    """Runs a prepared job's steps on the training thread, which owns it.

    `step_delay_s` > 0 sleeps that long in every step after the backward pass (cut short by
    a stop), to emulate a straggler (`shardps-worker --step-delay-ms`).
    """

    def __init__(self, ctx: JobContext, shards: JobShards, job: Prepared,
                 step_delay_s: float = 0.0):
        self.ctx, self.shards, self.job = ctx, shards, job
        self.step_delay_s = step_delay_s
        spec = job.spec
        self.mode: str = spec["consistency"]["mode"]
        self.eval_every: int = spec["stop"]["eval_every"]
        self.clip: float = spec["optimizer"]["clip_grad_norm"]
        self.source = batchsource.open_source(
            job.data, spec["data"], spec["seed"], ctx.metrics.files_read.labels(job=ctx.job_id).inc)
        self.evaluated = 0  # the last step evaluated: replayed steps are not evaluated again
        if job.tables:  # embedding tables fetch and push through the job's row client
            job.tables.bind(shards.rows, shards)

    def run(self) -> None:
        """Steps until the budget (forever if 0), then finishes; raises End otherwise.
        Closes the batch source (its read-ahead thread and files) either way."""
        try:
            self._run()
        finally:
            self.source.close()

    def _run(self) -> None:
        ctx, budget = self.ctx, self.job.budget
        self.job.model.train()
        step = 0
        place = (ctx.assignment().rank, ctx.assignment().world_size)
        while not budget or step < budget:
            ctx.check_stop()
            assignment = ctx.assignment()
            if (assignment.rank, assignment.world_size) != place:
                place = (assignment.rank, assignment.world_size)
                logger.info("job %s: rank %d of %d from step %d on (membership epoch %d)",
                            ctx.job_id, *place, step, assignment.epoch)
            try:
                step = self._step(step, assignment)
            except Rewind as rewind:
                step = step if rewind.step is None else rewind.step
        self._finish(step)

    def _step(self, step: int, assignment: coordinator_pb2.WorkerAssignment) -> int:
        """One step: returns the next step to run (at or past the budget: none is left)."""
        ctx, job, clock = self.ctx, self.job, self.ctx.clock
        started = clock()
        versions = self.shards.pull(self.mode, step, job.flat)
        step = step_after_pull(self.mode, step, versions)
        if job.budget and step >= job.budget:
            return step
        if is_eval_step(assignment.rank, step, self.eval_every) and step > self.evaluated:
            self.evaluated = step
            ctx.reports.send(evals=eval_points(step, evaluate(job.model, job.data, ctx.device)))
            ctx.check_stop()  # a verdict on this evaluation: stop without pushing
        pulled = clock()
        batch = self.source.take(step, assignment.rank, assignment.world_size)
        loss = self._compute(step, batch)
        grad = job.flat.host_grad()
        if job.tables:  # before the dense push, which may close the sync round
            job.tables.push(step, len(batch))
        computed = clock()
        # sync: the next step's pull goes out right behind the push (its answer, version
        # step + 1, is one set of weights whenever it is asked for).
        then_pull = ({**pull_args(self.mode, step + 1), "timeout_s": PULL_SLICE_S}
                     if self.mode == "sync" else None)
        replies = self.shards.push(grad, step, versions, len(batch), then_pull)
        if any(r.status == ps_pb2.PUSH_STATUS_JOB_DONE for r in replies):
            raise End("stopped", "the servers say the job has ended")
        if any(r.status == ps_pb2.PUSH_STATUS_STALE for r in replies):
            logger.info("job %s: push of step %d was stale (its round had closed)",
                        ctx.job_id, step)
        pushed = clock()
        hist = ctx.metrics.step_seconds
        hist.labels(phase="compute").observe(computed - pulled)
        hist.labels(phase="push").observe(pushed - computed)
        self._record(step, len(batch), loss, started, pushed)
        return step + 1

    def _compute(self, step: int, batch: batchsource.Batch) -> float:
        """Forward and backward on this rank's slice of the batch; the loss (nan if empty)."""
        ctx, job = self.ctx, self.job
        job.flat.zero_grad()
        if job.tables:  # admission counts a step's training pulls once
            job.tables.start_step(step)
        loss = math.nan
        if len(batch):
            loss_t = tasks.loss(job.data.task, job.model(*batch.inputs_on(ctx.device)),
                                batch.target.to(ctx.device))
            loss = float(loss_t.detach())
            if not math.isfinite(loss):
                raise ctx.fail(f"non-finite training loss {loss} at step {step}")
            loss_t.backward()
            norm = clip_grad_norm(job.flat, job.tables, self.clip)  # dense and row gradients
            if not math.isfinite(norm):
                raise ctx.fail(f"non-finite gradient (norm {norm}) at step {step}")
        # else: more workers than samples in a batch; push a zero gradient of weight 0
        # so the sync round still counts this worker.
        if self.step_delay_s > 0:  # emulate a straggler
            ctx.pause(self.step_delay_s)
            ctx.check_stop()
        return loss

    def _record(self, step: int, samples: int, loss: float, started: float,
                pushed: float) -> None:
        """Counts a pushed step and queues its report (sent when due)."""
        ctx = self.ctx
        ctx.metrics.steps.labels(job=ctx.job_id).inc()
        if samples:
            ctx.metrics.samples.labels(job=ctx.job_id).inc(samples)
            ctx.metrics.loss.labels(job=ctx.job_id).set(loss)
            ctx.reports.buffer.add(coordinator_pb2.StepReport(
                step=step, loss=loss, samples=samples, duration_ms=(pushed - started) * 1000.0))
        if ctx.reports.buffer.due(pushed):
            ctx.reports.send()

    def _finish(self, step: int) -> None:
        """At the step budget: rank 0 evaluates the final version; every rank reports finished."""
        ctx, job = self.ctx, self.job
        if ctx.assignment().rank != 0 and (late := _late_finish_s()):
            time.sleep(late)  # fault injection: the other ranks' last reports come late
        ctx.check_stop()
        evals: list[coordinator_pb2.EvalPoint] = []
        if ctx.assignment().rank == 0:
            try:
                versions = self.shards.pull(self.mode, step, job.flat)
            except Rewind:  # a server restored at the very end: start this job over here
                raise End("abandoned", "a server rolled back while finishing") from None
            evals = eval_points(step, evaluate(job.model, job.data, ctx.device))
            logger.info("job %s: final evaluation at versions %s: %s", ctx.job_id, versions,
                        ", ".join(f"{e.metric}={e.value:.4g}" for e in evals))
        ctx.reports.send(evals=evals, finished=True)
