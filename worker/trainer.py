"""The training loop of one job on one worker (docs/architecture.md, "Job life cycle" 3-6 and
"The training loop"): set the job up, then pull -> forward/backward -> push until told to stop."""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from shardps.proto import codec, common_pb2, coordinator_pb2, ps_pb2
from shardps.proto import spec as spec_lib
from shardps.proto.states import FINAL_STATES, MODE_VALUES
from shardps.psclient import client as psclient
from shardps.runtime.backoff import Backoff
from shardps.worker import recovery, tasks
from shardps.worker.batches import BatchOrder, steps_for_epochs
from shardps.worker.coordclient import Cancelled, CoordinatorClient, Unreachable
from shardps.worker.datasets import Dataset, load_dataset
from shardps.worker.evaluate import evaluate
from shardps.worker.flat import FlatParams
from shardps.worker.metrics import WorkerMetrics
from shardps.worker.models import build_model

logger = logging.getLogger(__name__)

# The coordinator fails a job still initialising after 120 s; waiting a little longer lets
# its verdict (a final state) be what ends the wait, not our own timeout.
INIT_TIMEOUT_S = 130.0
# While another rank initialises the job, GetJob long-polls: the coordinator holds each call
# up to WAIT_RUNNING_HOLD_S until the job leaves PENDING. One it answers at once (it holds only
# so many calls) is repeated POLL_INTERVAL_S after the previous one began.
WAIT_RUNNING_HOLD_S = 1.0
POLL_INTERVAL_S = 0.25
PULL_SLICE_S = 1.0        # one pull waits on the servers at most this long, then we look at stop
PULL_PATIENCE_S = 600.0   # no weights of the wanted version for this long: abandon the job
REPORT_INTERVAL_S = 0.5   # step losses are batched into one ReportProgress at most this often
# A pull or push that fails transiently (both are idempotent) is retried with doubling pauses
# from PS_BACKOFF_S up to PS_MAX_BACKOFF_S for PS_OUTAGE_S: long enough for a server to be
# restarted and restore its checkpoint, and for the coordinator to move it in the shard map.
PS_BACKOFF_S = 0.25
PS_MAX_BACKOFF_S = 2.0
PS_OUTAGE_S = 180.0

# torch.manual_seed sets a process-wide generator: trainers of several workers in one process
# (tests, embedding) take turns seeding and building, so each model is the factory's output
# under the job's seed alone.
_SEEDED_BUILD = threading.Lock()


# Fault injection for tests: ranks other than 0 wait this many ms before their last report
# at the step budget (so the job ends, on rank 0's report, before their last steps arrive).
LATE_FINISH_ENV = "SHARDPS_FAULT_LATE_FINISH_MS"


def _late_finish_s() -> float:
    return max(0, int(os.environ.get(LATE_FINISH_ENV, "0") or 0)) / 1000


# -- decisions (pure) -----------------------------------------------------------------------


def pull_args(mode: str, step: int) -> dict[str, int]:
    """PSClient.pull keywords for step t: sync waits for version t, ssp presents clock t."""
    return {"min_version": step if mode == "sync" else 0, "clock": step if mode == "ssp" else 0}


def step_after_pull(mode: str, step: int, versions: Sequence[int]) -> int:
    """The step to compute after pulling `versions` for step `step`.

    In sync mode version v means rounds 0..v-1 are closed; if the servers are ahead (this
    worker joined late, or was counted out of some rounds), pushing older steps would only be
    STALE, so jump to the current round. Other modes keep their own clock.
    """
    if mode == "sync" and versions:
        return max(step, min(versions))
    return step


def is_eval_step(rank: int, step: int, eval_every: int) -> bool:
    """Rank 0 evaluates the weights pulled for step t, before pushing it, every eval_every steps."""
    return rank == 0 and step > 0 and eval_every > 0 and step % eval_every == 0


def step_budget(stop: dict[str, Any], num_train: int, batch_size: int) -> int:
    """Global steps to run: stop.max_steps and/or the steps of stop.max_epochs (the smaller if
    both); 0 means unbounded (the job ends on a target or patience verdict)."""
    budgets = [b for b in (stop["max_steps"],
                           steps_for_epochs(stop["max_epochs"], num_train, batch_size)) if b > 0]
    return min(budgets) if budgets else 0


def worker_ids(job: coordinator_pb2.JobInfo) -> list[str]:
    """Node ids of the job's live workers in rank order; ValueError unless ranks are 0..K-1.

    JobInfo.workers also lists workers the job has lost (alive = false, rank = -1).
    """
    ordered = sorted((w for w in job.workers if w.alive), key=lambda w: w.rank)
    if not ordered or [w.rank for w in ordered] != list(range(len(ordered))):
        raise ValueError(f"job {job.job_id} lists worker ranks "
                         f"{[w.rank for w in ordered]}, expected 0..K-1")
    return [w.node_id for w in ordered]


def shard_config(spec: dict[str, Any], workers: Sequence[str], epoch: int, fingerprint: str,
                 budget: int) -> ps_pb2.ShardConfig:
    """The job-wide part of every shard's config (PSClient.init fills in the per-shard fields).

    The schedule horizon defaults to the job's step budget when the spec leaves it 0.
    """
    opt = spec["optimizer"]
    sched = opt["schedule"]
    return ps_pb2.ShardConfig(
        optimizer=common_pb2.OptimizerConfig(
            name=opt["name"], lr=opt["lr"], beta1=opt["betas"][0], beta2=opt["betas"][1],
            eps=opt["eps"], weight_decay=opt["weight_decay"], schedule=sched["name"],
            warmup_steps=sched["warmup_steps"], total_steps=sched["total_steps"] or budget,
            min_lr=sched["min_lr"]),
        mode=MODE_VALUES[spec["consistency"]["mode"]],
        staleness=spec["consistency"]["staleness"],
        workers=list(workers),
        epoch=epoch,
        layout_fingerprint=fingerprint,
        checkpoint_every_steps=spec["checkpoint"]["every_steps"],
        checkpoint_keep=spec["checkpoint"]["keep"],
        step_budget=budget if spec["consistency"]["mode"] == "sync" else 0,
    )


def eval_points(step: int, metrics: dict[str, float]) -> list[coordinator_pb2.EvalPoint]:
    """One EvalPoint per metric in the metrics' order (primary first), each carrying the loss."""
    return [coordinator_pb2.EvalPoint(step=step, metric=name, value=value, loss=metrics["loss"])
            for name, value in metrics.items()]


def metric_problem(spec: dict[str, Any], task: str) -> str:
    """Why the job's stop target can never be met on this task's metrics ("" if it can)."""
    target = spec["stop"]["target"]
    if target and target["metric"] not in tasks.METRICS[task]:
        return (f"stop.target.metric {target['metric']!r} is not computed for {task} datasets "
                f"(they report {', '.join(tasks.METRICS[task])})")
    return ""


class ReportBuffer:
    """Step reports waiting to be sent; due at most every `interval_s`. Pure: takes `now`."""

    def __init__(self, interval_s: float = REPORT_INTERVAL_S):
        self.interval_s = interval_s
        self.pending: list[coordinator_pb2.StepReport] = []
        self.last_sent = -math.inf

    def add(self, report: coordinator_pb2.StepReport) -> None:
        self.pending.append(report)

    def due(self, now: float) -> bool:
        return bool(self.pending) and now - self.last_sent >= self.interval_s

    def take(self, now: float) -> list[coordinator_pb2.StepReport]:
        steps, self.pending = self.pending, []
        self.last_sent = now
        return steps


# -- the loop -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a job ended on this worker."""

    kind: str    # "finished" (step budget reached), "stopped" (told to, or the job ended),
    #              "failed" (reported as the job's failure), "abandoned" (gave up: unreachable),
    #              "fenced" (a server refused this incarnation's push: register again)
    reason: str


class _End(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.outcome = Outcome(kind, reason)


class _Rewind(Exception):
    """sync: go back to `step` (a rollback), or, if None, pull the same step again."""

    def __init__(self, step: int | None):
        super().__init__(f"rewind to step {step}")
        self.step = step


PSFactory = Callable[..., Any]  # (job_id, shard_map, *, dtype, chunk_bytes, worker_id, incarnation)


class Trainer:
    """Runs one job's assignment on this worker until the job ends or `stop()` is called.

    `run()` blocks and belongs to one training thread, which owns the model, data and
    PSClient. `stop()` and `update_assignment()` may be called from any thread (the daemon's
    heartbeat thread); the loop notices within about PULL_SLICE_S plus one step.
    `step_delay_s` > 0 sleeps that long in every step after the backward pass (interrupted by
    `stop()`), to emulate a straggler (`shardps-worker --step-delay-ms`).
    """

    def __init__(self, stub: Any, node_id: str, incarnation: int,
                 assignment: coordinator_pb2.WorkerAssignment, device: str = "cpu",
                 metrics: WorkerMetrics | None = None, ps_factory: PSFactory = psclient.PSClient,
                 clock: Callable[[], float] = time.monotonic, step_delay_s: float = 0.0):
        self.node_id = node_id
        self.incarnation = incarnation
        self.job_id = assignment.job_id
        self.device = torch.device(device)
        self.step_delay_s = step_delay_s
        # Rollbacks (docs/architecture.md, "Failures"): the last one taken, and while one is
        # being taken, the version every shard must be back at before training goes on.
        self._rollback_id = assignment.rollback_id
        self._resync_to: int | None = None
        self._evaluated = 0  # the last step evaluated: replayed steps are not evaluated again
        self._spec: dict[str, Any] = {}
        self.metrics = metrics or WorkerMetrics()
        self._ps_factory = ps_factory
        self._clock = clock
        self._stop = threading.Event()
        self._stop_reason = ""
        self._lock = threading.Lock()
        self._assignment = coordinator_pb2.WorkerAssignment()
        self._assignment.CopyFrom(assignment)
        self.coordinator = CoordinatorClient(stub, stop=self._stop)
        self._reports = ReportBuffer()
        self._ps: Any = None
        self.flat: FlatParams | None = None  # exposed for tests and the final weights

    # -- control from other threads --

    def stop(self, reason: str) -> None:
        """Asks the loop to end (thread-safe); the first reason given is the one recorded."""
        with self._lock:
            if not self._stop.is_set():
                self._stop_reason = reason
                self._stop.set()
        self.coordinator.cancel_waits()  # a GetJob long-poll ends now, not at its hold's end

    def update_assignment(self, assignment: coordinator_pb2.WorkerAssignment) -> None:
        """Takes a new rank / world size / epoch of the same job from the next step on."""
        with self._lock:
            self._assignment.CopyFrom(assignment)

    def assignment(self) -> coordinator_pb2.WorkerAssignment:
        with self._lock:
            copy = coordinator_pb2.WorkerAssignment()
            copy.CopyFrom(self._assignment)
            return copy

    # -- the job --

    def run(self) -> Outcome:
        """Sets up and trains the job; returns how it ended. Never raises."""
        try:
            self._run()
            outcome = Outcome("finished", "reached the step budget")
        except _End as end:
            outcome = end.outcome
            if outcome.kind == "stopped":
                self._flush_reports()
        except Unreachable as exc:
            outcome = Outcome("abandoned", str(exc))
        except grpc.RpcError as exc:
            outcome = Outcome("abandoned", f"{exc.code().name}: {exc.details()}")
        except Exception as exc:  # a bug or a user model/dataset error: the job cannot go on
            logger.exception("job %s failed", self.job_id)
            outcome = self._failed(f"{type(exc).__name__}: {exc}")
        finally:
            if self._ps is not None:
                self._ps.close()
        log = logger.info if outcome.kind in ("finished", "stopped") else logger.warning
        log("job %s %s: %s", self.job_id, outcome.kind, outcome.reason)
        return outcome

    def _run(self) -> None:
        job = self._get_job()
        self._end_if_final(job)
        spec = self._guard("job spec", lambda: spec_lib.parse_spec(job.spec_yaml))
        data_spec = spec["data"]
        data: Dataset = self._guard(f"dataset {data_spec['dataset']!r}", lambda: load_dataset(
            data_spec["dataset"], data_spec["kwargs"], spec["seed"]))
        if problem := metric_problem(spec, data.task):
            raise self._fail(problem)
        if self.device.type == "cuda":  # kernels and streams of this thread go to our device
            torch.cuda.set_device(self.device)
        with _SEEDED_BUILD:
            torch.manual_seed(spec["seed"])
            model = self._guard(f"model {spec['model']['name']!r}", lambda: build_model(
                spec["model"]["name"], spec["model"]["kwargs"], data.info))
        flat = self.flat = FlatParams(model, self.device)
        budget = step_budget(spec["stop"], data.num_train, data_spec["batch_size"])

        if self.assignment().rank == 0 and job.state == common_pb2.JOB_STATE_PENDING:
            self._initialise(job, spec, flat, budget)
        else:  # other ranks, and a rank 0 (re)joining a job that is already running
            self._connect(spec, self._wait_running(flat.layout.fingerprint).shard_map)
        self._train(spec, data, model, flat, budget)

    def _connect(self, spec: dict[str, Any], shard_map: common_pb2.ShardMap) -> None:
        self._spec = spec
        self._ps = recovery.RemappableClient(
            self._ps_factory, self.job_id, shard_map, dtype=codec.DTYPE_NAMES[spec["transport"]["dtype"]],
            chunk_bytes=spec["transport"]["chunk_bytes"], worker_id=self.node_id,
            incarnation=self.incarnation)

    def _initialise(self, job: coordinator_pb2.JobInfo, spec: dict[str, Any], flat: FlatParams,
                    budget: int) -> None:
        """Rank 0: SetLayout, InitShard on every server, ActivateJob."""
        workers = self._guard("job workers", lambda: worker_ids(job))
        if self.node_id not in workers:
            raise _End("abandoned", f"GetJob does not list this worker among {workers}")
        try:
            shard_map = self.coordinator.call("SetLayout", coordinator_pb2.SetLayoutRequest(
                job_id=self.job_id, node_id=self.node_id, incarnation=self.incarnation,
                layout=flat.layout)).shard_map
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # the model's layout is unusable
                raise self._fail(f"SetLayout rejected the layout: {exc.details()}") from None
            raise
        self._connect(spec, shard_map)
        config = shard_config(spec, workers, self.assignment().epoch, flat.layout.fingerprint,
                              budget)
        if job.resume_from:  # the servers load the old job's checkpoint instead
            config.resume_from_job = job.resume_from
            config.resume_version = self._guard("resume", lambda: recovery.resume_version(
                shard_map, job.resume_from, spec["consistency"]["mode"] == "sync"))
            logger.info("job %s resumes job %s from checkpoint version %s", self.job_id,
                        job.resume_from, config.resume_version if config.resume_version >= 0
                        else "newest")
        self._ps_call("InitShard", functools.partial(self._ps.init, flat.weights_cpu(), config))
        reply = self.coordinator.call("ActivateJob", coordinator_pb2.ActivateJobRequest(
            job_id=self.job_id, node_id=self.node_id, incarnation=self.incarnation))
        if reply.state != common_pb2.JOB_STATE_RUNNING:
            raise _End("stopped", f"ActivateJob left the job {common_pb2.JobState.Name(reply.state)}")
        logger.info("job %s initialised: %d parameters on %d shards", self.job_id,
                    flat.numel, len(shard_map.shards))

    def _wait_running(self, fingerprint: str) -> coordinator_pb2.JobInfo:
        """Long-polls GetJob until the job runs; checks that its layout is the one we built."""
        deadline = self._clock() + INIT_TIMEOUT_S
        while True:
            self._check_stop()
            asked = self._clock()
            job = self._get_job(wait_while=common_pb2.JOB_STATE_PENDING)
            self._end_if_final(job)
            if job.state == common_pb2.JOB_STATE_RUNNING:
                if job.layout.fingerprint != fingerprint:
                    raise self._fail(f"layout mismatch: rank {self.assignment().rank} built "
                                     f"fingerprint {fingerprint}, the job has "
                                     f"{job.layout.fingerprint}")
                if not job.shard_map.shards:
                    raise _End("abandoned", "job is RUNNING but has no shard map")
                return job
            if self._clock() > deadline:
                raise _End("abandoned", f"job not RUNNING within {INIT_TIMEOUT_S:.0f} s "
                                        f"(still {common_pb2.JobState.Name(job.state)})")
            self._stop.wait(max(0.0, POLL_INTERVAL_S - (self._clock() - asked)))

    def _train(self, spec: dict[str, Any], data: Dataset, model: torch.nn.Module,
               flat: FlatParams, budget: int) -> None:
        mode = spec["consistency"]["mode"]
        eval_every = spec["stop"]["eval_every"]
        clip = spec["optimizer"]["clip_grad_norm"]
        order = BatchOrder(data.num_train, spec["data"]["batch_size"], spec["data"]["shuffle"],
                           spec["seed"])
        hist = self.metrics.step_seconds
        model.train()
        step = 0
        place = (self.assignment().rank, self.assignment().world_size)
        while not budget or step < budget:
            self._check_stop()
            assignment = self.assignment()
            if (assignment.rank, assignment.world_size) != place:
                place = (assignment.rank, assignment.world_size)
                logger.info("job %s: rank %d of %d from step %d on (membership epoch %d)",
                            self.job_id, *place, step, assignment.epoch)
            started = self._clock()
            try:
                versions = self._pull(mode, step, flat)
            except _Rewind as rewind:
                step = step if rewind.step is None else rewind.step
                continue
            step = step_after_pull(mode, step, versions)
            if budget and step >= budget:
                break
            if is_eval_step(assignment.rank, step, eval_every) and step > self._evaluated:
                self._evaluated = step
                metrics = evaluate(model, data, self.device)
                self._report(evals=eval_points(step, metrics))
                self._check_stop()  # a verdict on this evaluation: stop without pushing
            pulled = self._clock()

            index = order.slice(step, assignment.rank, assignment.world_size)
            flat.zero_grad()
            loss = math.nan
            if len(index):
                x = data.train_x[index].to(self.device)
                y = data.train_y[index].to(self.device)
                loss_t = tasks.loss(data.task, model(x), y)
                loss = float(loss_t.detach())
                if not math.isfinite(loss):
                    raise self._fail(f"non-finite training loss {loss} at step {step}")
                loss_t.backward()
                norm = flat.clip_grad_norm(clip)
                if not math.isfinite(norm):
                    raise self._fail(f"non-finite gradient (norm {norm}) at step {step}")
            # else: more workers than samples in a batch; push a zero gradient of weight 0
            # so the sync round still counts this worker.
            if self.step_delay_s > 0:  # emulate a straggler
                self._stop.wait(self.step_delay_s)
                self._check_stop()
            grad = flat.host_grad()
            computed = self._clock()

            # sync: the next step's pull goes out right behind the push (its answer, version
            # step + 1, is one set of weights whenever it is asked for).
            then_pull = ({**pull_args(mode, step + 1), "timeout_s": PULL_SLICE_S}
                         if mode == "sync" else None)
            try:
                replies = self._ps_call("push", functools.partial(
                    self._ps.push, grad, step=step, base_version=list(versions),
                    batch_size=len(index), then_pull=then_pull))
            except _Rewind as rewind:
                step = step if rewind.step is None else rewind.step
                continue
            if any(r.status == ps_pb2.PUSH_STATUS_JOB_DONE for r in replies):
                raise _End("stopped", "the servers say the job has ended")
            if any(r.status == ps_pb2.PUSH_STATUS_STALE for r in replies):
                logger.info("job %s: push of step %d was stale (its round had closed)",
                            self.job_id, step)
            pushed = self._clock()

            hist.labels(phase="compute").observe(computed - pulled)
            hist.labels(phase="push").observe(pushed - computed)
            self.metrics.steps.labels(job=self.job_id).inc()
            if len(index):
                self.metrics.samples.labels(job=self.job_id).inc(len(index))
                self.metrics.loss.labels(job=self.job_id).set(loss)
                self._reports.add(coordinator_pb2.StepReport(
                    step=step, loss=loss, samples=len(index),
                    duration_ms=(pushed - started) * 1000.0))
            if self._reports.due(pushed):
                self._report()
            step += 1
        self._finish(mode, step, data, model, flat)

    def _finish(self, mode: str, step: int, data: Dataset, model: torch.nn.Module,
                flat: FlatParams) -> None:
        """At the step budget: rank 0 evaluates the final version; every rank reports finished."""
        if self.assignment().rank != 0 and (late := _late_finish_s()):
            time.sleep(late)  # fault injection: the other ranks' last reports come late
        self._check_stop()
        evals: list[coordinator_pb2.EvalPoint] = []
        if self.assignment().rank == 0:
            try:
                versions = self._pull(mode, step, flat)
            except _Rewind:  # a server restored at the very end: start this job over here
                raise _End("abandoned", "a server rolled back while finishing") from None
            evals = eval_points(step, evaluate(model, data, self.device))
            logger.info("job %s: final evaluation at versions %s: %s", self.job_id, versions,
                        ", ".join(f"{e.metric}={e.value:.4g}" for e in evals))
        self._report(evals=evals, finished=True)

    # -- pull, push and reports --

    def _pull(self, mode: str, step: int, flat: FlatParams) -> list[int]:
        """Pulls the weights for `step` into the model, waiting in slices; returns the versions."""
        kwargs = pull_args(mode, step)
        since = self._clock()
        hist = self.metrics.step_seconds
        while True:
            self._check_stop()
            self._check_rollback()
            dest = flat.host_weights
            begun = self._clock()
            result = self._ps_call("pull", functools.partial(
                self._ps.pull, dest, timeout_s=PULL_SLICE_S, **kwargs))
            if result.ready and self._resync_to is not None:
                if any(v != self._resync_to for v in result.versions):
                    # Some shard has not rolled back yet: its weights belong to another step.
                    self._stop.wait(POLL_INTERVAL_S)
                    continue
                logger.info("job %s: every shard is back at version %d", self.job_id,
                            self._resync_to)
                self._resync_to = None
            if result.ready:
                flat.upload()
                hist.labels(phase="pull").observe(self._clock() - begun)
                return list(result.versions)
            hist.labels(phase="wait").observe(self._clock() - begun)
            if result.job_done:
                raise _End("stopped", "the servers say the job has ended")
            now = self._clock()
            if now - since > PULL_PATIENCE_S:
                raise _End("abandoned", f"no weights for step {step} ({kwargs}) within "
                                        f"{PULL_PATIENCE_S:.0f} s; versions {result.versions}")
            if self._reports.due(now):  # keep the coordinator informed while we wait
                self._report()

    def _ps_call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Runs a parameter-server call; rides out outages, maps refusals to outcomes.

        Transient errors (a server down, restarting, or not yet told of a membership change)
        are retried with backoff for PS_OUTAGE_S; between tries the shard map is re-read, so
        a server that came back at another address is followed, and (pull/push) a rollback
        ends the call. A fenced push ends the job here (the daemon registers again); a push
        ahead of a restored shard's round rewinds to a pull.
        """
        backoff = Backoff(PS_BACKOFF_S, PS_MAX_BACKOFF_S, PS_OUTAGE_S, self._clock)
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                action = recovery.classify(code, details)
                if action == recovery.INVALID:  # we sent something wrong
                    raise self._fail(f"server rejected {what}: {details}") from None
                if action == recovery.FENCED:
                    self.metrics.refused.labels(reason="fenced").inc()
                    raise _End("fenced", f"{what} refused: {details}") from None
                if action == recovery.RESYNC:
                    self.metrics.refused.labels(reason="step_ahead").inc()
                    logger.info("job %s: %s refused (%s); pulling again", self.job_id, what,
                                details)
                    raise _Rewind(None) from None
                if action == recovery.ABANDON or backoff.expired():
                    raise _End("abandoned", f"{what} failed: {code.name}: {details}"
                               + (f" (for {PS_OUTAGE_S:.0f} s)" if backoff.tries else "")) from None
                pause = backoff.next()
                self.metrics.retries.labels(call=what, code=code.name).inc()
                if backoff.tries == 1 or backoff.tries % 10 == 0:
                    logger.warning("job %s: %s %s (%s); retrying for up to %.0f s (try %d)",
                                   self.job_id, what, code.name, details, PS_OUTAGE_S,
                                   backoff.tries)
                if self._stop.wait(pause):
                    self._check_stop()
                self._refresh_shard_map()
                if what in ("pull", "push"):
                    self._check_rollback()

    def _refresh_shard_map(self) -> None:
        """Follows the coordinator's shard map (best effort: it may be down as well)."""
        try:
            job = self.coordinator.call("GetJob", coordinator_pb2.GetJobRequest(
                job_id=self.job_id), attempts=1)
        except (grpc.RpcError, Unreachable):
            return
        if self._ps is not None and self._ps.remap(job.job.shard_map):
            logger.info("job %s: shard map version %d: %s", self.job_id,
                        job.job.shard_map.version,
                        ", ".join(f"{s.index}@{s.address}" for s in job.job.shard_map.shards))

    def _check_rollback(self) -> None:
        """Raises _Rewind if the coordinator has announced a rollback we have not taken."""
        assignment = self.assignment()
        if assignment.rollback_id <= self._rollback_id:
            return
        self._rollback_id = assignment.rollback_id
        self._resync_to = assignment.rollback_version
        self.metrics.rollbacks.labels(job=self.job_id).inc()
        logger.warning("job %s: rollback %d: a server restored version %d; resuming at step %d "
                       "(the steps after it are replayed)", self.job_id, assignment.rollback_id,
                       assignment.rollback_version, assignment.rollback_version)
        raise _Rewind(assignment.rollback_version)

    def _flush_reports(self) -> None:
        """Sends the step reports still pending when the loop stops (one try): steps of a job
        that has just ended still count in its history."""
        if not self._reports.pending:
            return
        request = coordinator_pb2.ReportProgressRequest(
            job_id=self.job_id, node_id=self.node_id, incarnation=self.incarnation,
            steps=self._reports.take(self._clock()), rollback_id=self._rollback_id)
        try:
            self.coordinator.call("ReportProgress", request, attempts=1)
        except (grpc.RpcError, Unreachable) as exc:
            logger.warning("job %s: %d last step report(s) not delivered: %s", self.job_id,
                           len(request.steps), exc)

    def _report(self, evals: Sequence[coordinator_pb2.EvalPoint] = (), finished: bool = False,
                failure: str = "") -> coordinator_pb2.ReportProgressResponse:
        """Sends pending step losses (plus evals / finished / failure); STOP sets the stop flag."""
        request = coordinator_pb2.ReportProgressRequest(
            job_id=self.job_id, node_id=self.node_id, incarnation=self.incarnation,
            steps=self._reports.take(self._clock()), evals=list(evals), finished=finished,
            failure=failure, rollback_id=self._rollback_id)
        try:
            reply = self.coordinator.call("ReportProgress", request)
        except grpc.RpcError as exc:
            if recovery.stale_incarnation(exc.code(), exc.details()):
                self.metrics.refused.labels(reason="fenced").inc()
                raise _End("fenced", f"the coordinator refused this incarnation: "
                                     f"{exc.details()}") from None
            raise
        if reply.action == coordinator_pb2.WORKER_ACTION_STOP:
            self.stop(f"the coordinator says stop (job {common_pb2.JobState.Name(reply.state)})")
        return reply

    # -- ends --

    def _get_job(self, wait_while: int = common_pb2.JOB_STATE_UNSPECIFIED) -> coordinator_pb2.JobInfo:
        """The job now, or (wait_while) once it has left that state or a long-poll hold has
        passed; `stop()` cuts the hold short."""
        if not wait_while:
            return self.coordinator.call("GetJob", coordinator_pb2.GetJobRequest(
                job_id=self.job_id)).job
        request = coordinator_pb2.GetJobRequest(job_id=self.job_id, wait_while_state=wait_while,
                                                wait_ms=int(WAIT_RUNNING_HOLD_S * 1000))
        try:
            return self.coordinator.call("GetJob", request, cancellable=True,
                                         deadline_s=WAIT_RUNNING_HOLD_S + self.coordinator.deadline_s).job
        except Cancelled:  # by stop()
            raise _End("stopped", self._stop_reason) from None

    def _end_if_final(self, job: coordinator_pb2.JobInfo) -> None:
        if job.state in FINAL_STATES:
            raise _End("stopped", f"job is {common_pb2.JobState.Name(job.state)}: {job.reason}")

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _End("stopped", self._stop_reason)

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Runs a setup step whose errors are the user's (spec, dataset, model): report them."""
        try:
            return fn()
        except Exception as exc:
            raise self._fail(f"{what}: {exc}") from None

    def _failed(self, reason: str) -> Outcome:
        """Reports `reason` as this worker's failure of the job (best effort)."""
        try:
            self._report(failure=reason)
        except (grpc.RpcError, Unreachable, _End) as exc:
            logger.warning("job %s: could not report failure %r: %s", self.job_id, reason, exc)
        return Outcome("failed", reason)

    def _fail(self, reason: str) -> _End:
        """Reports the failure and returns the exception that ends the loop (raise it)."""
        outcome = self._failed(reason)
        return _End(outcome.kind, outcome.reason)
