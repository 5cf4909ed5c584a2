"""A worker's progress reports on one job to the coordinator: step losses batched by a
ReportBuffer (pure), evaluations, the finish and a failure, sent by a Reporter."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import grpc

from shardps.proto import common_pb2, coordinator_pb2
from shardps.worker import recovery
from shardps.worker.coordclient import CoordinatorClient, Unreachable
from shardps.worker.metrics import WorkerMetrics
from shardps.worker.outcome import End, Outcome

logger = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.5   # step losses are batched into one ReportProgress at most this often


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


class Reporter:
    """Sends one job's ReportProgress calls for this worker incarnation.

    Owned by the training thread. Every report carries `rollback_id`, the last rollback this
    worker has taken (the job's shards move it on). A STOP answer calls `on_stop(reason)`.
    """

    def __init__(self, coordinator: CoordinatorClient, job_id: str, node_id: str,
                 incarnation: int, rollback_id: int, metrics: WorkerMetrics,
                 clock: Callable[[], float], on_stop: Callable[[str], None]):
        self.coordinator = coordinator
        self.job_id, self.node_id, self.incarnation = job_id, node_id, incarnation
        self.rollback_id = rollback_id
        self.buffer = ReportBuffer()
        self._metrics = metrics
        self._clock = clock
        self._on_stop = on_stop

    def _request(self, evals: Sequence[coordinator_pb2.EvalPoint] = (), finished: bool = False,
                 failure: str = "") -> coordinator_pb2.ReportProgressRequest:
        return coordinator_pb2.ReportProgressRequest(
            job_id=self.job_id, node_id=self.node_id, incarnation=self.incarnation,
            steps=self.buffer.take(self._clock()), evals=list(evals), finished=finished,
            failure=failure, rollback_id=self.rollback_id)

    def send(self, evals: Sequence[coordinator_pb2.EvalPoint] = (), finished: bool = False,
             failure: str = "") -> coordinator_pb2.ReportProgressResponse:
        """Sends pending step losses (plus evals / finished / failure); STOP calls on_stop.

        Raises End("fenced") if the coordinator refuses this incarnation, Unreachable or
        grpc.RpcError if it cannot be told.
        """
        request = self._request(evals, finished, failure)
        try:
            reply = self.coordinator.call("ReportProgress", request)
        except grpc.RpcError as exc:
            if recovery.stale_incarnation(exc.code(), exc.details()):
                self._metrics.refused.labels(reason="fenced").inc()
                raise End("fenced", f"the coordinator refused this incarnation: "
                                    f"{exc.details()}") from None
            raise
        if reply.action == coordinator_pb2.WORKER_ACTION_STOP:
            self._on_stop(f"the coordinator says stop (job "
                          f"{common_pb2.JobState.Name(reply.state)})")
        return reply

    def flush(self) -> None:
        """Sends the step reports still pending when the loop stops (one try): steps of a job
        that has just ended still count in its history."""
        if not self.buffer.pending:
            return
        request = self._request()
        try:
            self.coordinator.call("ReportProgress", request, attempts=1)
        except (grpc.RpcError, Unreachable) as exc:
            logger.warning("job %s: %d last step report(s) not delivered: %s", self.job_id,
                           len(request.steps), exc)

    def failed(self, reason: str) -> Outcome:
        """Reports `reason` as this worker's failure of the job (best effort)."""
        try:
            self.send(failure=reason)
        except (grpc.RpcError, Unreachable, End) as exc:
            logger.warning("job %s: could not report failure %r: %s", self.job_id, reason, exc)
        return Outcome("failed", reason)

    def fail(self, reason: str) -> End:
        """Reports the failure and returns the exception that ends the loop (raise it)."""
        outcome = self.failed(reason)
        return End(outcome.kind, outcome.reason)
