"""The training of one job on one worker (docs/architecture.md, "Job life cycle" 3-6 and "The
training loop"): the Trainer sets the job up (jobsetup.py), runs the step loop (steploop.py)
against the job's shards (shards.py) until told to stop, and says how it ended."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
import torch

from shardps.proto import codec, common_pb2, coordinator_pb2, coordinator_pb2_grpc
from shardps.psclient import PSClient
from shardps.worker import jobsetup, recovery, wirepush
from shardps.worker.batchsource import BatchSource
from shardps.worker.coordclient import Unreachable
from shardps.worker.flat import FlatParams
from shardps.worker.jobcontext import JobContext
from shardps.worker.jobsetup import Prepared
from shardps.worker.metrics import WorkerMetrics
from shardps.worker.outcome import End, Outcome
from shardps.worker.shards import JobShards
from shardps.worker.steploop import StepLoop

logger = logging.getLogger(__name__)


class Trainer:
    """Runs one job's assignment on this worker until the job ends or `stop()` is called.

    `run()` blocks and belongs to one training thread, which owns the model, data and
    parameter-server client. `stop()` and `update_assignment()` may be called from any thread
    (the daemon's heartbeat thread); the loop notices within about shards.PULL_SLICE_S plus
    one step. `step_delay_s` > 0 sleeps that long in every step after the backward pass
    (interrupted by `stop()`), to emulate a straggler (`shardps-worker --step-delay-ms`).
    """

    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorStub, node_id: str,
                 incarnation: int, assignment: coordinator_pb2.WorkerAssignment,
                 device: str = "cpu", metrics: WorkerMetrics | None = None,
                 ps_factory: recovery.ShardClientFactory = PSClient,
                 clock: Callable[[], float] = time.monotonic, step_delay_s: float = 0.0):
        self.node_id = node_id
        self.incarnation = incarnation
        self.job_id = assignment.job_id
        self.metrics = metrics or WorkerMetrics()
        self.step_delay_s = step_delay_s
        self._ctx = JobContext(stub, node_id, incarnation, assignment, torch.device(device),
                               self.metrics, clock)
        self._ps_factory = ps_factory
        self._shards: JobShards | None = None
        self.flat: FlatParams | None = None  # exposed for tests and the final weights
        self._source: BatchSource | None = None  # exposed for tests (files read)

    # -- control from other threads --

    def stop(self, reason: str) -> None:
        """Asks the loop to end (thread-safe); the first reason given is the one recorded."""
        self._ctx.stop(reason)

    def update_assignment(self, assignment: coordinator_pb2.WorkerAssignment) -> None:
        """Takes a new rank / world size / epoch of the same job from the next step on."""
        self._ctx.update_assignment(assignment)

    def assignment(self) -> coordinator_pb2.WorkerAssignment:
        return self._ctx.assignment()

    # -- the job --

    def run(self) -> Outcome:
        """Sets up and trains the job; returns how it ended. Never raises."""
        try:
            self._run()
            outcome = Outcome("finished", "reached the step budget")
        except End as end:
            outcome = end.outcome
            if outcome.kind == "stopped":
                self._ctx.reports.flush()
        except Unreachable as exc:
            outcome = Outcome("abandoned", str(exc))
        except grpc.RpcError as exc:
            outcome = Outcome("abandoned", f"{exc.code().name}: {exc.details()}")
        except Exception as exc:  # a bug or a user model/dataset error: the job cannot go on
            logger.exception("job %s failed", self.job_id)
            outcome = self._ctx.reports.failed(f"{type(exc).__name__}: {exc}")
        finally:
            if self._shards is not None:
                self._shards.close()
        log = logger.info if outcome.kind in ("finished", "stopped") else logger.warning
        log("job %s %s: %s", self.job_id, outcome.kind, outcome.reason)
        return outcome

    def _run(self) -> None:
        ctx = self._ctx
        job = jobsetup.get_job(ctx)
        jobsetup.end_if_final(job)
        prepared = jobsetup.prepare(ctx, job)
        self.flat = prepared.flat
        if ctx.assignment().rank == 0 and job.state == common_pb2.JOB_STATE_PENDING:
            jobsetup.initialise(ctx, job, prepared, lambda shard_map: self._connect(
                prepared, shard_map))
        else:  # other ranks, and a rank 0 (re)joining a job that is already running
            running = jobsetup.wait_running(ctx, prepared.flat.layout.fingerprint)
            self._connect(prepared, running.shard_map)
        assert self._shards is not None  # both ways connected
        loop = StepLoop(ctx, self._shards, prepared, self.step_delay_s)
        self._source = loop.source
        loop.run()

    def _connect(self, prepared: Prepared, shard_map: common_pb2.ShardMap) -> JobShards:
        transport = prepared.spec["transport"]
        self._shards = JobShards(self._ctx, self._ps_factory, shard_map,
                                 dtype=codec.DTYPE_NAMES[transport["dtype"]],
                                 chunk_bytes=transport["chunk_bytes"],
                                 compress_pull=transport["compress_pull"],
                                 wire=wirepush.for_spec(prepared.spec, self._ctx.job_id, self._ctx.metrics))
        return self._shards
