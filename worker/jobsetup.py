"""Setting one job up on a worker (docs/architecture.md, "Job life cycle" 3-5): the spec, the
dataset and the model built under the job's seed; then rank 0 of a new job initialises the
servers, and every other rank waits until the job runs and connects to its shards."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from shardps.proto import common_pb2, coordinator_pb2
from shardps.proto import spec as spec_lib
from shardps.proto.states import FINAL_STATES
from shardps.worker import batchsource, recovery, tablesync
from shardps.worker.coordclient import Cancelled
from shardps.worker.decisions import metric_problem, shard_config, step_budget, worker_ids
from shardps.worker.flat import FlatParams
from shardps.worker.jobcontext import JobContext
from shardps.worker.models import build_model
from shardps.worker.outcome import End
from shardps.worker.shards import JobShards

logger = logging.getLogger(__name__)

# The coordinator fails a job still initialising after 120 s; waiting a little longer lets
# its verdict (a final state) be what ends the wait, not our own timeout.
INIT_TIMEOUT_S = 130.0
# While another rank initialises the job, GetJob long-polls: the coordinator holds each call
# up to WAIT_RUNNING_HOLD_S until the job leaves PENDING. One it answers at once (it holds only
# so many calls) is repeated POLL_INTERVAL_S after the previous one began.
WAIT_RUNNING_HOLD_S = 1.0
POLL_INTERVAL_S = 0.25

# torch.manual_seed sets a process-wide generator: trainers of several workers in one process
# (tests, embedding) take turns seeding and building, so each model is the factory's output
# under the job's seed alone.
_SEEDED_BUILD = threading.Lock()


@dataclass(frozen=True)
class Prepared:
    """A job set up on this worker: its spec, data, model (and its flat view), step budget."""

    spec: spec_lib.JobSpec
    data: batchsource.TrainData
    model: torch.nn.Module
    flat: FlatParams
    budget: int
    tables: tablesync.TableSync | None = None  # the model's embedding tables, attached


def get_job(ctx: JobContext,
            wait_while: common_pb2.JobState = common_pb2.JOB_STATE_UNSPECIFIED) -> coordinator_pb2.JobInfo:
    """The job now, or (wait_while) once it has left that state or a long-poll hold has
    passed; `ctx.stop()` cuts the hold short."""
    if not wait_while:
        return ctx.coordinator.call("GetJob", coordinator_pb2.GetJobRequest(job_id=ctx.job_id)).job
    request = coordinator_pb2.GetJobRequest(job_id=ctx.job_id, wait_while_state=wait_while,
                                            wait_ms=int(WAIT_RUNNING_HOLD_S * 1000))
    try:
        return ctx.coordinator.call("GetJob", request, cancellable=True,
                                    deadline_s=WAIT_RUNNING_HOLD_S + ctx.coordinator.deadline_s).job
    except Cancelled:  # by stop()
        raise ctx.stopped() from None


def end_if_final(job: coordinator_pb2.JobInfo) -> None:
    if job.state in FINAL_STATES:
        raise End("stopped", f"job is {common_pb2.JobState.Name(job.state)}: {job.reason}")


def prepare(ctx: JobContext, job: coordinator_pb2.JobInfo) -> Prepared:
    """Parses the spec, loads the dataset and builds the model under the job's seed; a user's
    error in any of them is reported as the job's failure."""
    spec = ctx.guard("job spec", lambda: spec_lib.parse_spec(job.spec_yaml))
    data_spec = spec["data"]
    data: batchsource.TrainData = ctx.guard(f"dataset {data_spec['dataset']!r}", lambda: (
        batchsource.load_data(data_spec, spec["seed"])))
    if problem := metric_problem(spec, data.task):
        raise ctx.fail(problem)
    if ctx.device.type == "cuda":  # kernels and streams of this thread go to our device
        torch.cuda.set_device(ctx.device)
    with _SEEDED_BUILD:
        torch.manual_seed(spec["seed"])
        model = ctx.guard(f"model {spec['model']['name']!r}", lambda: build_model(
            spec["model"]["name"], spec["model"]["kwargs"], data.info))
    # Tables first: an attached table gives up its weight, which so stays out of the flat layout.
    tables = ctx.guard("embedding tables", lambda: tablesync.attach(model, spec))
    flat = FlatParams(model, ctx.device)
    budget = step_budget(spec["stop"], data.num_train, data_spec["batch_size"])
    return Prepared(spec, data, model, flat, budget, tables)


def initialise(ctx: JobContext, job: coordinator_pb2.JobInfo, prepared: Prepared,
               connect: Callable[[common_pb2.ShardMap], JobShards]) -> None:
    """Rank 0: SetLayout, InitShard on every server (through the JobShards that `connect`
    makes on the layout's shard map), ActivateJob."""
    spec, flat = prepared.spec, prepared.flat
    workers = ctx.guard("job workers", lambda: worker_ids(job))
    if ctx.node_id not in workers:
        raise End("abandoned", f"GetJob does not list this worker among {workers}")
    layout = common_pb2.Layout()
    layout.CopyFrom(flat.layout)
    if prepared.tables:  # the coordinator refuses replicas and reshards for a job with tables
        layout.tables.extend(name for name, _ in prepared.tables.modules)
    try:
        shard_map = ctx.coordinator.call("SetLayout", coordinator_pb2.SetLayoutRequest(
            job_id=ctx.job_id, node_id=ctx.node_id, incarnation=ctx.incarnation,
            layout=layout)).shard_map
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # the model's layout is unusable
            raise ctx.fail(f"SetLayout rejected the layout: {exc.details()}") from None
        raise
    shards = connect(shard_map)
    config = shard_config(spec, workers, ctx.assignment().epoch, flat.layout.fingerprint,
                          prepared.budget)
    if job.resume_from:  # the servers load the old job's checkpoint instead
        config.resume_from_job = job.resume_from
        config.resume_version = ctx.guard("resume", lambda: recovery.resume_version(
            shard_map, job.resume_from, spec["consistency"]["mode"] == "sync"))
        logger.info("job %s resumes job %s from checkpoint version %s", ctx.job_id,
                    job.resume_from, config.resume_version if config.resume_version >= 0
                    else "newest")
    if prepared.tables:
        config.tables.extend(prepared.tables.specs(len(shard_map.shards)))
    shards.init(flat.weights_cpu(), config)
    if prepared.tables and not job.resume_from:  # a resumed job's rows come from its checkpoint
        prepared.tables.bind(shards.rows, shards)
        prepared.tables.seed()
    reply = ctx.coordinator.call("ActivateJob", coordinator_pb2.ActivateJobRequest(
        job_id=ctx.job_id, node_id=ctx.node_id, incarnation=ctx.incarnation))
    if reply.state != common_pb2.JOB_STATE_RUNNING:
        raise End("stopped", f"ActivateJob left the job {common_pb2.JobState.Name(reply.state)}")
    logger.info("job %s initialised: %d parameters on %d shards", ctx.job_id, flat.numel,
                len(shard_map.shards))


def wait_running(ctx: JobContext, fingerprint: str) -> coordinator_pb2.JobInfo:
    """Long-polls GetJob until the job runs; checks that its layout is the one we built."""
    deadline = ctx.clock() + INIT_TIMEOUT_S
    while True:
        ctx.check_stop()
        asked = ctx.clock()
        job = get_job(ctx, wait_while=common_pb2.JOB_STATE_PENDING)
        end_if_final(job)
        if job.state == common_pb2.JOB_STATE_RUNNING:
            if job.layout.fingerprint != fingerprint:
                raise ctx.fail(f"layout mismatch: rank {ctx.assignment().rank} built "
                               f"fingerprint {fingerprint}, the job has {job.layout.fingerprint}")
            if not job.shard_map.shards:
                raise End("abandoned", "job is RUNNING but has no shard map")
            return job
        if ctx.clock() > deadline:
            raise End("abandoned", f"job not RUNNING within {INIT_TIMEOUT_S:.0f} s "
                                   f"(still {common_pb2.JobState.Name(job.state)})")
        ctx.pause(max(0.0, POLL_INTERVAL_S - (ctx.clock() - asked)))
