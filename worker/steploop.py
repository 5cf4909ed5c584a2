"""The step loop of one job on one worker (docs/architecture.md, "The training loop"): pull ->
forward/backward -> push until the step budget, then the finish (rank 0's final evaluation and
every rank's last report)."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from shardps.proto import coordinator_pb2, ps_pb2
from shardps.psclient.overlapped import OverlappedPush
from shardps.worker import batchsource, tasks
from shardps.worker.clipping import clip_grad_norm
from shardps.worker.decisions import eval_points, is_eval_step, pull_args, step_after_pull
from shardps.worker.evaluate import evaluate
from shardps.worker.jobcontext import JobContext
from shardps.worker.jobsetup import Prepared
from shardps.worker.outcome import End
from shardps.worker.overlap import Overlap, PullBroken
from shardps.worker.shards import PULL_SLICE_S, JobShards, Landing, Rewind

logger = logging.getLogger(__name__)

# Fault injection for tests: ranks other than 0 wait this many ms before their last report
# at the step budget (so the job ends, on rank 0's report, before their last steps arrive).
LATE_FINISH_ENV = "SHARDPS_FAULT_LATE_FINISH_MS"


def _late_finish_s() -> float:
    return max(0, int(os.environ.get(LATE_FINISH_ENV, "0") or 0)) / 1000


def _overlap_of(ctx: JobContext, job: Prepared,
                step_delay_s: float) -> tuple[Overlap | None, bool]:
    """The job's overlap hooks (None: off) and whether pushes overlap backward too.

    transport.overlap, on a CPU device (CUDA weights and gradients go through staging
    copies of the whole vector), with dense pulls. Pushes only where the gradient is final
    when autograd hands it over and goes out as it is: no clipping (it scales everything
    after backward), no compression, no embedding tables (their push must come first), no
    straggler delay (it must hold the push back)."""
    transport = job.spec["transport"]
    if not transport["overlap"] or ctx.device.type != "cpu" or transport["compress_pull"] != "none":
        return None, False
    push = (transport["compress"] == "none" and job.spec["optimizer"]["clip_grad_norm"] == 0
            and job.tables is None and step_delay_s <= 0)
    metric = ctx.metrics.bucket_wait.labels(direction="pull")
    return Overlap(job.model, job.flat.layout, on_wait=metric.observe,
                   bucket_bytes=transport["bucket_bytes"]), push


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
        self.overlap, self.push_overlap = _overlap_of(ctx, job, step_delay_s)
        if job.tables:  # embedding tables fetch and push through the job's row client
            job.tables.bind(shards.rows, shards)

    def run(self) -> None:
        """Steps until the budget (forever if 0), then finishes; raises End otherwise.
        Closes the batch source (its read-ahead thread and files) either way."""
        try:
            self._run()
        finally:
            self.source.close()
            if self.overlap is not None:
                self.overlap.close()

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
                if rewind.step is not None and self.job.tables:  # a rollback
                    self.job.tables.rolled_back(rewind.step)
                step = step if rewind.step is None else rewind.step
        self._finish(step)

    def _step(self, step: int, assignment: coordinator_pb2.WorkerAssignment) -> int:
        """One step: returns the next step to run (at or past the budget: none is left)."""
        ctx, job, clock = self.ctx, self.job, self.ctx.clock
        started = clock()
        versions, landing = self._pull(step)
        try:
            step = step_after_pull(self.mode, step, versions)
            if job.budget and step >= job.budget:
                return step
            if is_eval_step(assignment.rank, step, self.eval_every) and step > self.evaluated:
                self._land(landing)  # evaluation reads every weight
                landing = None
                self.evaluated = step
                ctx.reports.send(evals=eval_points(step, evaluate(job.model, job.data, ctx.device)))
                ctx.check_stop()  # a verdict on this evaluation: stop without pushing
            pulled = clock()
            batch = self.source.take(step, assignment.rank, assignment.world_size)
            # sync: the next step's pull goes out right behind the push (its answer, version
            # step + 1, is one set of weights whenever it is asked for).
            then_pull = ({**pull_args(self.mode, step + 1), "timeout_s": PULL_SLICE_S}
                         if self.mode == "sync" else None)
            loss, overlapped = self._compute(step, batch, landing, (versions, then_pull))
            landing = None  # landed by _compute
        finally:
            if landing is not None:  # an error or an early return: wait out its readers
                landing.inflight.cancel()
        grad = job.flat.host_grad()
        if job.tables:  # before the dense push, which may close the sync round
            job.tables.push(step, len(batch))
        computed = clock()
        replies = self.shards.push(grad, step, versions, len(batch), then_pull, overlapped)
        if overlapped is not None:
            pieces = ctx.metrics.overlap_pieces
            pieces.labels(sent="during").inc(overlapped.early)
            pieces.labels(sent="after").inc(overlapped.pieces - overlapped.early)
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

    def _pull(self, step: int) -> tuple[list[int], Landing | None]:
        """The weights for `step`: landed, or (overlap) still landing."""
        if self.overlap is None:
            return self.shards.pull(self.mode, step, self.job.flat), None
        return self.shards.pull_landing(self.mode, step, self.job.flat)

    def _land(self, landing: Landing | None) -> None:
        """Waits for the rest of an overlapped pull (None: nothing to wait for)."""
        if landing is not None:
            self.shards.land(landing, self.job.flat)

    def _compute(self, step: int, batch: batchsource.Batch, landing: Landing | None,
                 push_args: tuple[list[int], dict[str, Any] | None],
                 ) -> tuple[float, OverlappedPush | None]:
        """Forward and backward on this rank's slice of the batch: the loss (nan if empty),
        and the overlapped push that backward filled in (None: push the gradient whole).
        `landing` has landed when this returns; `push_args`: the push's versions and
        then_pull."""
        ctx, job = self.ctx, self.job
        job.flat.zero_grad()
        if job.tables:  # a rewound step's row gradients are dropped; admission counts once
            job.tables.forget()
            job.tables.start_step(step)
        loss = math.nan
        overlapped = None
        if len(batch):
            out = self._forward(batch, landing)
            loss_t = tasks.loss(job.data.task, out, batch.target.to(ctx.device))
            loss = float(loss_t.detach())
            if not math.isfinite(loss):
                raise ctx.fail(f"non-finite training loss {loss} at step {step}")
            overlapped = self._begin_push(step, len(batch), *push_args)
            try:
                loss_t.backward()
                if overlapped is not None:
                    overlapped.backward_done()
                norm = clip_grad_norm(job.flat, job.tables, self.clip)  # dense and row gradients
                if not math.isfinite(norm):
                    raise ctx.fail(f"non-finite gradient (norm {norm}) at step {step}")
            except BaseException:
                if overlapped is not None:
                    overlapped.cancel()
                raise
            finally:
                if self.overlap is not None:
                    self.overlap.disarm_push()
        else:
            # More workers than samples in a batch: push a zero gradient of weight 0 so the
            # sync round still counts this worker.
            self._land(landing)
        if self.step_delay_s > 0:  # emulate a straggler
            ctx.pause(self.step_delay_s)
            ctx.check_stop()
        return loss, overlapped

    def _forward(self, batch: batchsource.Batch, landing: Landing | None) -> torch.Tensor:
        """The model's output; with a landing, each module waits for its own weights."""
        ctx, job = self.ctx, self.job
        if landing is None or self.overlap is None:
            return job.model(*batch.inputs_on(ctx.device))
        self.overlap.arm_pull(landing.inflight)
        try:
            out = job.model(*batch.inputs_on(ctx.device))
        except PullBroken as exc:
            raise self.shards.broken(exc.cause) from None
        finally:
            self.overlap.disarm_pull()
        self._land(landing)
        return out

    def _begin_push(self, step: int, batch_size: int, versions: list[int],
                    then_pull: dict[str, Any] | None) -> OverlappedPush | None:
        """The push that backward's hooks fill in, bucket by bucket; None where pushes go
        whole (overlap off, clipping, embedding tables, a straggler's delay, or no server
        reachable right now)."""
        if self.overlap is None or not self.push_overlap:
            return None
        overlapped = self.shards.begin_push(self.job.flat.host_grad(), step, versions,
                                            batch_size, then_pull, self.overlap.buckets)
        if overlapped is not None:
            self.overlap.arm_push(overlapped)
        return overlapped

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
