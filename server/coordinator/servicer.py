"""The coordinator's gRPC servicer: translates proto <-> core calls under one lock and maps
the core's exceptions to status codes (callchecks.py). Replies are built in views.py, held
long-polls live in longpoll.py, the state dir in statekeeper.py, servers' shard reports in
shardreports.py."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry

from shardps.proto import common_pb2, coordinator_pb2_grpc, names
from shardps.proto import coordinator_pb2 as pb
from shardps.proto.spec import SpecError, normalise
from shardps.proto.states import FINAL_STATES

from . import callchecks, resharding, shardreports, views
from .callchecks import MAX_FAILURE_TEXT, required
from .history import Evaluation, StepReport
from .jobs import INIT_TIMEOUT_S, JobTable
from .longpoll import MAX_HELD_CALLS, HeldCalls
from .membership import Membership
from .metrics import CoordinatorMetrics, Snapshot, take_snapshot
from .statekeeper import StateKeeper


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """Implements shardps.v1.Coordinator over a Membership and a JobTable.

    Owns both. Every RPC (on gRPC's pool threads), `sweep()` (the daemon's sweeper thread)
    and metrics scrapes take one lock, so the core never sees two callers at once. Every RPC
    first expires leases by the monotonic clock.

    Status codes: INVALID_ARGUMENT for a bad spec (the message names the key) or bad input,
    NOT_FOUND for an unknown job or node, FAILED_PRECONDITION for a call the job's state or
    the caller's role does not allow. A refused call changes nothing. A spec is parsed and
    validated before the lock is taken (shardps.proto.spec bounds what that costs), so no
    submit holds up heartbeats.

    With a `state_dir`, the node and job tables persist there (docs/architecture.md,
    "Failures"): a change to membership, a job's state, nodes, layout or shard map is
    written before the RPC that made it replies; loss histories at the latest on the next
    `sweep()` (the daemon's timer). A restarted coordinator loads them and carries on.

    Long-polls (an idle worker's heartbeat waiting for an assignment, a GetJob waiting for a
    state change) wait on a condition of that lock (HeldCalls), so they hold no lock while
    they wait; every RPC and sweep that ends while some are held wakes them to look again.
    At most `max_held_calls` are held at once (the others are answered at once), each for
    at most lease_ms / 2 and never past `shutdown()`.

    Args:
        lease_ms: the lease handed to every node.
        registry: where the metrics go (a private registry if None).
        init_timeout_s: how long a job may take from assignment to ActivateJob.
        state_dir: where the state is kept; None keeps it in memory only.
        max_held_calls: long-polls held at once; the server's pool needs threads beyond them.
        sweep_period_s: how often `sweep()` is called (the daemon's timer); leases do not
            count a longer gap between checks (a stall: Membership). None: every second counts.

    Raises:
        StateError: the state dir holds a state that cannot be loaded.
    """

    def __init__(self, lease_ms: int = 5000, registry: CollectorRegistry | None = None,
                 init_timeout_s: float = INIT_TIMEOUT_S, state_dir: str | None = None,
                 max_held_calls: int = MAX_HELD_CALLS, sweep_period_s: float | None = None):
        self._lock = threading.Lock()
        self._membership = Membership(lease_ms, sweep_period_s)
        self._jobs = JobTable(init_timeout_s)
        self.metrics = CoordinatorMetrics(registry or CollectorRegistry(), self._snapshot)
        self._held = HeldCalls(self._lock, max_held_calls, self.metrics)
        self._keeper = (StateKeeper(state_dir, self._membership, self._jobs, self.metrics)
                        if state_dir else None)
        if self._keeper is not None:
            self._keeper.load()

    @property
    def lease_ms(self) -> int:
        return self._membership.lease_ms

    def sweep(self) -> None:
        """Expires leases and initialisation timeouts now (the daemon calls it on a timer),
        and writes the state if anything is unsaved."""
        with self._lock:
            self._sweep(time.monotonic())
            upto = self._keeper.capture(lazy=True) if self._keeper is not None else 0
            self._held.wake()
        if self._keeper is not None:
            self._keeper.flush(upto)

    def shutdown(self) -> None:
        """Answers every held long-poll now and holds no more (the daemon is stopping)."""
        self._held.close()

    def scrape_targets(self) -> list[dict]:
        """Prometheus HTTP service discovery: every alive node that serves metrics.

        Thread-safe (takes the state lock); served by the metrics endpoint at /sd.
        """
        with self._lock:
            return [{"targets": [node.metrics_address],
                     "labels": {"role": node.role_name, "node": node.node_id}}
                    for node in self._membership.alive() if node.metrics_address]

    # -- nodes -----------------------------------------------------------------------------

    def RegisterNode(self, request: pb.RegisterNodeRequest,
                     context: grpc.ServicerContext) -> pb.RegisterNodeResponse:
        with self._serving(context) as now:
            callchecks.node_text(request, ("address", "metrics_address", "device", "hostname"))
            node = self._membership.register(
                request.role, request.address, now, node_id=request.node_id,
                metrics_address=request.metrics_address, device=request.device,
                hostname=request.hostname,
                stored=[(s.job_id, s.shard_index) for s in request.stored])
            self._jobs.node_registered(node, now)
            shardreports.apply(self._jobs, self.metrics, node.node_id, request.restored,
                               request.frozen)
            reply = pb.RegisterNodeResponse(node_id=node.node_id, incarnation=node.incarnation,
                                            lease_ms=self.lease_ms)
            if node.role == common_pb2.ROLE_SERVER:
                reply.jobs.extend(views.server_views(self._jobs, self._membership, node.node_id))
            return reply

    def Heartbeat(self, request: pb.HeartbeatRequest,
                  context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        with self._serving(context) as now:
            wait_ms = callchecks.wait_ms(request.wait_for_assignment_ms, "wait_for_assignment_ms")
            reply = pb.HeartbeatResponse(lease_ms=self.lease_ms)
            node_id = request.node_id
            if not self._membership.heartbeat(node_id, request.incarnation, now,
                                              request.shutting_down):
                reply.unknown_node = True
            elif request.shutting_down:
                self._jobs.node_lost(node_id, now, "shut down")
            else:
                self._jobs.node_seen(node_id)
                shardreports.apply(self._jobs, self.metrics, node_id, request.restored,
                                   request.frozen)
                shardreports.caught_up(self._jobs, node_id, request.caught_up)
                if request.caught_up:  # a move's copy caught up: promoted in this very reply
                    self._jobs.advance_reshards(self._membership, now)
                self._jobs.schedule(self._membership, now)
                if self._membership.get(node_id).role == common_pb2.ROLE_WORKER:
                    self._worker_heartbeat(request, context, wait_ms, reply)
                else:
                    reply.jobs.extend(views.server_views(self._jobs, self._membership, node_id))
            return reply

    def _worker_heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext,
                          wait_ms: int, reply: pb.HeartbeatResponse) -> None:
        """Fills a live worker's heartbeat reply with its assignment, holding the call up to
        `wait_ms` for one if it has none (caller holds the lock)."""
        node_id, incarnation = request.node_id, request.incarnation
        if wait_ms:
            self._hold("heartbeat", context, wait_ms, lambda: (
                self._jobs.assignment(node_id) is not None
                or not self._membership.current(node_id, incarnation)))
            if not self._membership.current(node_id, incarnation):
                reply.unknown_node = True  # re-registered or declared dead meanwhile
                return
        job = self._jobs.assignment(node_id)
        if job is not None:
            reply.assignment.CopyFrom(views.assignment(job, node_id))

    def ListNodes(self, request: pb.ListNodesRequest,
                  context: grpc.ServicerContext) -> pb.ListNodesResponse:
        with self._serving(context) as now:
            return pb.ListNodesResponse(nodes=[views.node_info(n, self._jobs, now)
                                               for n in self._membership.nodes()])

    # -- jobs ------------------------------------------------------------------------------

    def SubmitJob(self, request: pb.SubmitJobRequest,
                  context: grpc.ServicerContext) -> pb.SubmitJobResponse:
        try:  # outside the lock: bounded (shardps.proto.spec), but the longest part of a submit
            spec = normalise(request.spec_yaml)
        except SpecError as exc:
            self.metrics.rejected_specs.inc()
            callchecks.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._serving(context) as now:
            job = self._jobs.submit(spec, self._membership, now, resume_from=request.resume_from)
            self.metrics.jobs_submitted.inc()
            return pb.SubmitJobResponse(job_id=job.job_id)

    def GetJob(self, request: pb.GetJobRequest,
               context: grpc.ServicerContext) -> pb.GetJobResponse:
        with self._serving(context) as now:
            job = self._jobs.get(required(request.job_id, "job_id"))
            if wait_ms := callchecks.wait_ms(request.wait_ms, "wait_ms"):
                if request.wait_while_state == common_pb2.JOB_STATE_UNSPECIFIED:
                    raise ValueError("wait_while_state is required with wait_ms")
                self._hold("get_job", context, wait_ms,
                           lambda: job.state != request.wait_while_state)
                now = time.monotonic()
            return pb.GetJobResponse(job=views.job_info(job, now, request.include_history))

    def ListJobs(self, request: pb.ListJobsRequest,
                 context: grpc.ServicerContext) -> pb.ListJobsResponse:
        with self._serving(context) as now:
            return pb.ListJobsResponse(jobs=[views.job_summary(j, now)
                                             for j in self._jobs.jobs()])

    def CancelJob(self, request: pb.CancelJobRequest,
                  context: grpc.ServicerContext) -> pb.CancelJobResponse:
        with self._serving(context) as now:
            state = self._jobs.cancel(required(request.job_id, "job_id"), now)
            return pb.CancelJobResponse(state=state)

    def Reshard(self, request: pb.ReshardRequest,
                context: grpc.ServicerContext) -> pb.ReshardResponse:
        with self._serving(context) as now:
            reshard = self._jobs.reshard(required(request.job_id, "job_id"), request.servers,
                                         self._membership, now)
            return pb.ReshardResponse(reshard=resharding.progress(reshard, now))

    def SetLayout(self, request: pb.SetLayoutRequest,
                  context: grpc.ServicerContext) -> pb.SetLayoutResponse:
        with self._serving(context) as now:
            shard_map = self._jobs.set_layout(
                required(request.job_id, "job_id"), required(request.node_id, "node_id"),
                request.incarnation, request.layout, self._membership, now)
            return pb.SetLayoutResponse(shard_map=shard_map)

    def ActivateJob(self, request: pb.ActivateJobRequest,
                    context: grpc.ServicerContext) -> pb.ActivateJobResponse:
        with self._serving(context) as now:
            state = self._jobs.activate(
                required(request.job_id, "job_id"), required(request.node_id, "node_id"),
                request.incarnation, self._membership, now)
            return pb.ActivateJobResponse(state=state)

    def ReportProgress(self, request: pb.ReportProgressRequest,
                       context: grpc.ServicerContext) -> pb.ReportProgressResponse:
        with self._serving(context) as now:
            state = self._jobs.report_progress(
                required(request.job_id, "job_id"), required(request.node_id, "node_id"),
                request.incarnation, self._membership, now,
                steps=[StepReport(s.step, s.loss, s.samples, s.duration_ms)
                       for s in request.steps],
                evals=[Evaluation(e.step, e.metric, e.value, e.loss) for e in request.evals],
                finished=request.finished,
                failure=names.cut(request.failure, MAX_FAILURE_TEXT),
                rollback_id=request.rollback_id)
            if self._keeper is not None:
                self._keeper.dirty = True
            action = pb.WORKER_ACTION_STOP if state in FINAL_STATES else pb.WORKER_ACTION_CONTINUE
            return pb.ReportProgressResponse(action=action, state=state)

    # -- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _serving(self, context: grpc.ServicerContext) -> Iterator[float]:
        """Holds the lock, sweeps, yields `now`, turns core exceptions into aborts, captures
        what changed, wakes long-polls; then, unlocked, flushes it (StateKeeper.flush)."""
        with self._lock:
            now = time.monotonic()
            self._sweep(now)
            with callchecks.refusals(context, self.metrics.rejected_specs.inc):
                yield now
            upto = self._keeper.capture() if self._keeper is not None else 0
            self._held.wake()
        if self._keeper is not None:
            self._keeper.flush(upto)

    def _hold(self, call: str, context: grpc.ServicerContext, wait_ms: int,
              done: Callable[[], bool]) -> None:
        """A long-poll of at most `wait_ms` and lease_ms / 2 (caller holds the lock)."""
        self._held.hold(call, context, min(wait_ms, self.lease_ms // 2) / 1000.0, done)

    def _sweep(self, now: float) -> None:
        for node in self._jobs.sweep(self._membership, now):
            self.metrics.lease_expiries.labels(node.role_name).inc()

    def _snapshot(self) -> Snapshot:
        with self._lock:
            return take_snapshot(self._membership, self._jobs, time.monotonic())
