"""The coordinator's gRPC servicer: translates proto <-> core calls under one lock and maps
the core's exceptions to status codes."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import grpc
from prometheus_client import CollectorRegistry

from shardps.proto import common_pb2, coordinator_pb2_grpc
from shardps.proto import coordinator_pb2 as pb
from shardps.proto.spec import SpecError, normalise
from shardps.proto.states import FINAL_STATES

from .history import Evaluation, StepReport
from .jobs import INIT_TIMEOUT_S, Job, JobStateError, JobTable, UnknownJobError
from .membership import Membership, StaleNodeError, UnknownNodeError
from .metrics import CoordinatorMetrics, Snapshot, take_snapshot
from .state import StateFile, dump, restore, structure

log = logging.getLogger(__name__)

# Long-polls (HeartbeatRequest.wait_for_assignment_ms, GetJobRequest.wait_ms) held at once
# by default. Each holds a gRPC pool thread, so a big cluster's idle workers must not take
# them all: beyond this, calls are answered at once and their callers fall back on polling.
MAX_HELD_CALLS = 16
# Text a node may send that every ListNodes / ListJobs reply carries on (addresses, host and
# device names, a worker's failure message): bounded, so that no caller can make those
# replies too big for anyone to receive. Error messages are cut to MAX_ERROR characters.
MAX_NODE_TEXT = 1024
MAX_FAILURE_TEXT = 2048
MAX_ERROR = 1024
INT64_MAX = 2**63 - 1


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
    `persist()` (the daemon's timer). A restarted coordinator loads them and carries on.

    Long-polls (an idle worker's heartbeat waiting for an assignment, a GetJob waiting for a
    state change) wait on a condition of that lock, so they hold no lock while they wait;
    every RPC and sweep that ends while some are held wakes them to look again. At most
    `max_held_calls` are held at once (the others are answered at once), each for at most
    lease_ms / 2 and never past `shutdown()`.

    Args:
        lease_ms: the lease handed to every node.
        registry: where the metrics go (a private registry if None).
        init_timeout_s: how long a job may take from assignment to ActivateJob.
        state_dir: where the state is kept; None keeps it in memory only.
        max_held_calls: long-polls held at once; the server's pool needs threads beyond them.

    Raises:
        StateError: the state dir holds a state that cannot be loaded.
    """

    def __init__(self, lease_ms: int = 5000, registry: CollectorRegistry | None = None,
                 init_timeout_s: float = INIT_TIMEOUT_S, state_dir: str | None = None,
                 max_held_calls: int = MAX_HELD_CALLS):
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when an RPC or sweep ends
        self._held = 0  # long-polls waiting on _changed
        self._max_held = max_held_calls
        self._closing = False
        self._membership = Membership(lease_ms)
        self._jobs = JobTable(init_timeout_s)
        self.metrics = CoordinatorMetrics(registry or CollectorRegistry(), self._snapshot)
        self._state = StateFile(state_dir) if state_dir else None
        self._saved: tuple | None = None  # structure() of what is on disk
        self._dirty = False               # progress recorded since the last write
        self._dump_cache: dict[str, tuple[tuple, dict]] = {}
        if self._state is not None:
            self._load_state()

    @property
    def lease_ms(self) -> int:
        return self._membership.lease_ms

    def sweep(self) -> None:
        """Expires leases and initialisation timeouts now (the daemon calls it on a timer),
        and writes the state if anything is unsaved."""
        with self._lock:
            self._sweep(time.monotonic())
            self._persist(lazy=True)
            self._wake_held()

    def shutdown(self) -> None:
        """Answers every held long-poll now and holds no more (the daemon is stopping)."""
        with self._lock:
            self._closing = True
            self._changed.notify_all()

    def _load_state(self) -> None:
        assert self._state is not None
        doc = self._state.load()
        if doc is None:
            log.debug("no saved state in %s: starting empty", self._state.directory)
            return
        restore(doc, self._membership, self._jobs, time.monotonic(), time.time())
        self._saved = structure(self._membership, self._jobs)
        self.metrics.state_restores.inc()
        active = [j for j in self._jobs.jobs() if not j.final]
        log.warning("restored state from %s (saved %.1f s ago): %d nodes, %d jobs (%d not "
                    "ended); nodes have one lease to heartbeat again", self._state.path,
                    time.time() - doc.get("saved_unix", time.time()),
                    len(self._membership.nodes()), len(self._jobs.jobs()), len(active))

    def _persist(self, lazy: bool = False) -> None:
        """Writes the state if its structure changed, or (lazy) if progress is unsaved.
        Caller holds the lock. A failed write is logged and counted, never raised."""
        if self._state is None:
            return
        now_structure = structure(self._membership, self._jobs)
        if now_structure == self._saved and not (lazy and self._dirty):
            return
        try:
            size = self._state.save(dump(self._membership, self._jobs, time.monotonic(),
                                         time.time(), self._dump_cache))
        except OSError as exc:
            self.metrics.state_writes.labels("failed").inc()
            log.error("writing the state to %s failed: %s", self._state.path, exc)
            return
        self.metrics.state_writes.labels("written").inc()
        self.metrics.state_bytes.set(size)
        self._saved, self._dirty = now_structure, False

    # -- membership ------------------------------------------------------------------------

    def RegisterNode(self, request: pb.RegisterNodeRequest,
                     context: grpc.ServicerContext) -> pb.RegisterNodeResponse:
        with self._serving(context) as now:
            for name in ("address", "metrics_address", "device", "hostname"):
                if len(getattr(request, name)) > MAX_NODE_TEXT:
                    raise ValueError(f"{name}: at most {MAX_NODE_TEXT} characters, got "
                                     f"{len(getattr(request, name))}")
            node = self._membership.register(
                request.role, request.address, now, node_id=request.node_id,
                metrics_address=request.metrics_address, device=request.device,
                hostname=request.hostname,
                stored=[(s.job_id, s.shard_index) for s in request.stored])
            self._jobs.node_registered(node, now)
            self._shards_restored(node.node_id, request.restored)
            self._shards_frozen(node.node_id, request.frozen)
            reply = pb.RegisterNodeResponse(node_id=node.node_id, incarnation=node.incarnation,
                                            lease_ms=self.lease_ms)
            if node.role == common_pb2.ROLE_SERVER:
                reply.jobs.extend(self._server_views(node.node_id))
            return reply

    def Heartbeat(self, request: pb.HeartbeatRequest,
                  context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        with self._serving(context) as now:
            wait_ms = _wait_ms(request.wait_for_assignment_ms, "wait_for_assignment_ms")
            reply = pb.HeartbeatResponse(lease_ms=self.lease_ms)
            node_id = request.node_id
            if not self._membership.heartbeat(node_id, request.incarnation, now,
                                              request.shutting_down):
                reply.unknown_node = True
                return reply
            if request.shutting_down:
                self._jobs.node_lost(node_id, now, "shut down")
                return reply
            self._jobs.node_seen(node_id)
            self._shards_restored(node_id, request.restored)
            self._shards_frozen(node_id, request.frozen)
            self._jobs.schedule(self._membership, now)
            if self._membership.get(node_id).role == common_pb2.ROLE_WORKER:
                if wait_ms:
                    self._hold("heartbeat", context, wait_ms, lambda: (
                        self._jobs.assignment(node_id) is not None
                        or not self._membership.current(node_id, request.incarnation)))
                    if not self._membership.current(node_id, request.incarnation):
                        reply.unknown_node = True  # re-registered or declared dead meanwhile
                        return reply
                job = self._jobs.assignment(node_id)
                if job is not None:
                    reply.assignment.CopyFrom(pb.WorkerAssignment(
                        job_id=job.job_id, rank=job.rank(node_id),
                        world_size=len(job.workers), epoch=job.epoch,
                        rollback_id=job.rollback.id, rollback_version=job.rollback.version))
            else:
                reply.jobs.extend(self._server_views(node_id))
            return reply

    def _server_views(self, node_id: str) -> list[pb.ServerJobView]:
        """What a server must know of each job it hosts: state, live workers with their
        incarnations (it fences the others), and the job's last rollback."""
        views = []
        for job in self._jobs.server_jobs(node_id):
            incarnations = [n.incarnation if (n := self._membership.find(w)) else 0
                            for w in job.workers]
            view = pb.ServerJobView(
                job_id=job.job_id, state=job.state, epoch=job.epoch, live_workers=job.workers,
                live_incarnations=incarnations, rollback_id=job.rollback.id,
                rollback_version=job.rollback.version)
            if job.final and job.ending.final_version >= 0:
                view.final_version = job.ending.final_version
            views.append(view)
        return views

    def _shards_frozen(self, node_id: str, frozen) -> None:
        if frozen:
            self._jobs.shards_frozen(node_id, [(f.job_id, f.shard_index, f.version)
                                               for f in frozen])

    def _shards_restored(self, node_id: str, restored) -> None:
        for r in restored:
            log.warning("server %s restored job %s shard %d from its checkpoint at version %d "
                        "(%d update(s) past it lost)", node_id, r.job_id, r.shard_index,
                        r.version, r.lost_updates)
            self.metrics.shard_restores.inc()
            self.metrics.lost_updates.inc(max(0, r.lost_updates))
            if self._jobs.shard_restored(r.job_id, r.shard_index, r.version, r.lost_updates):
                self.metrics.rollbacks.inc()

    def ListNodes(self, request: pb.ListNodesRequest,
                  context: grpc.ServicerContext) -> pb.ListNodesResponse:
        with self._serving(context) as now:
            reply = pb.ListNodesResponse()
            for node in self._membership.nodes():
                info = reply.nodes.add(
                    node_id=node.node_id, role=node.role, address=node.address,
                    state=pb.NODE_STATE_ALIVE if node.alive else pb.NODE_STATE_DEAD,
                    incarnation=node.incarnation,
                    last_seen_ms_ago=int((now - node.last_seen) * 1000),
                    metrics_address=node.metrics_address, device=node.device,
                    hostname=node.hostname)
                if node.role == common_pb2.ROLE_WORKER:
                    job = self._jobs.assignment(node.node_id)
                    info.job_id = job.job_id if job else ""
                else:
                    info.jobs.extend(j.job_id for j in self._jobs.server_jobs(node.node_id))
            return reply

    # -- jobs ------------------------------------------------------------------------------

    def SubmitJob(self, request: pb.SubmitJobRequest,
                  context: grpc.ServicerContext) -> pb.SubmitJobResponse:
        try:  # outside the lock: bounded (shardps.proto.spec), but the longest part of a submit
            spec = normalise(request.spec_yaml)
        except SpecError as exc:
            self.metrics.rejected_specs.inc()
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._serving(context) as now:
            job = self._jobs.submit(spec, self._membership, now, resume_from=request.resume_from)
            self.metrics.jobs_submitted.inc()
            return pb.SubmitJobResponse(job_id=job.job_id)

    def GetJob(self, request: pb.GetJobRequest,
               context: grpc.ServicerContext) -> pb.GetJobResponse:
        with self._serving(context) as now:
            job = self._jobs.get(_required(request.job_id, "job_id"))
            if wait_ms := _wait_ms(request.wait_ms, "wait_ms"):
                if request.wait_while_state == common_pb2.JOB_STATE_UNSPECIFIED:
                    raise ValueError("wait_while_state is required with wait_ms")
                self._hold("get_job", context, wait_ms, lambda: job.state != request.wait_while_state)
                now = time.monotonic()
            return pb.GetJobResponse(job=self._job_info(job, now, request.include_history))

    def ListJobs(self, request: pb.ListJobsRequest,
                 context: grpc.ServicerContext) -> pb.ListJobsResponse:
        with self._serving(context) as now:
            return pb.ListJobsResponse(jobs=[self._job_info(j, now) for j in self._jobs.jobs()])

    def CancelJob(self, request: pb.CancelJobRequest,
                  context: grpc.ServicerContext) -> pb.CancelJobResponse:
        with self._serving(context) as now:
            state = self._jobs.cancel(_required(request.job_id, "job_id"), now)
            return pb.CancelJobResponse(state=state)

    def SetLayout(self, request: pb.SetLayoutRequest,
                  context: grpc.ServicerContext) -> pb.SetLayoutResponse:
        with self._serving(context) as now:
            shard_map = self._jobs.set_layout(
                _required(request.job_id, "job_id"), _required(request.node_id, "node_id"),
                request.incarnation, request.layout, self._membership, now)
            return pb.SetLayoutResponse(shard_map=shard_map)

    def ActivateJob(self, request: pb.ActivateJobRequest,
                    context: grpc.ServicerContext) -> pb.ActivateJobResponse:
        with self._serving(context) as now:
            state = self._jobs.activate(
                _required(request.job_id, "job_id"), _required(request.node_id, "node_id"),
                request.incarnation, self._membership, now)
            return pb.ActivateJobResponse(state=state)

    def ReportProgress(self, request: pb.ReportProgressRequest,
                       context: grpc.ServicerContext) -> pb.ReportProgressResponse:
        with self._serving(context) as now:
            state = self._jobs.report_progress(
                _required(request.job_id, "job_id"), _required(request.node_id, "node_id"),
                request.incarnation, self._membership, now,
                steps=[StepReport(s.step, s.loss, s.samples, s.duration_ms)
                       for s in request.steps],
                evals=[Evaluation(e.step, e.metric, e.value, e.loss) for e in request.evals],
                finished=request.finished, failure=_cut(request.failure, MAX_FAILURE_TEXT),
                rollback_id=request.rollback_id)
            self._dirty = True
            action = pb.WORKER_ACTION_STOP if state in FINAL_STATES else pb.WORKER_ACTION_CONTINUE
            return pb.ReportProgressResponse(action=action, state=state)

    # -- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _serving(self, context: grpc.ServicerContext) -> Iterator[float]:
        """Holds the lock, sweeps, yields `now`, and turns core exceptions into aborts."""
        with self._lock:
            now = time.monotonic()
            self._sweep(now)
            try:
                yield now
            except SpecError as exc:
                self.metrics.rejected_specs.inc()
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except ValueError as exc:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except (UnknownJobError, UnknownNodeError) as exc:
                _abort(context, grpc.StatusCode.NOT_FOUND, exc.args[0])
            except (JobStateError, StaleNodeError) as exc:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            self._persist()
            self._wake_held()

    def _hold(self, call: str, context: grpc.ServicerContext, wait_ms: int,
              done: Callable[[], bool]) -> None:
        """A long-poll: waits, without the lock, until done() (checked under the lock after
        every RPC and sweep), the hold is up, the call is cancelled or the coordinator stops.
        Returns at once when done() already holds or max_held_calls are held. Caller holds
        the lock (inside `_serving`)."""
        if done() or self._closing:
            return
        if self._held >= self._max_held:
            self.metrics.long_polls.labels(call, "over_limit").inc()
            return
        deadline = time.monotonic() + min(wait_ms, self.lease_ms // 2) / 1000.0
        self._held += 1
        self.metrics.held_calls.set(self._held)
        context.add_callback(self._wake_all)  # a cancelled call stops holding at once
        try:
            while not done():
                left = deadline - time.monotonic()
                if self._closing or not context.is_active():
                    self.metrics.long_polls.labels(call, "cancelled").inc()
                    return
                if left <= 0:
                    self.metrics.long_polls.labels(call, "timed_out").inc()
                    return
                self._changed.wait(left)
            self.metrics.long_polls.labels(call, "woken").inc()
        finally:
            self._held -= 1
            self.metrics.held_calls.set(self._held)

    def _wake_held(self) -> None:
        """Lets held long-polls look again (caller holds the lock)."""
        if self._held:
            self._changed.notify_all()

    def _wake_all(self) -> None:
        with self._lock:
            self._changed.notify_all()

    def _sweep(self, now: float) -> None:
        for node in self._jobs.sweep(self._membership, now):
            self.metrics.lease_expiries.labels(node.role_name).inc()

    def scrape_targets(self) -> list[dict]:
        """Prometheus HTTP service discovery: every alive node that serves metrics.

        Thread-safe (takes the state lock); served by the metrics endpoint at /sd.
        """
        with self._lock:
            return [{"targets": [node.metrics_address],
                     "labels": {"role": node.role_name, "node": node.node_id}}
                    for node in self._membership.alive() if node.metrics_address]

    def _snapshot(self) -> Snapshot:
        with self._lock:
            return take_snapshot(self._membership, self._jobs, time.monotonic())

    def _job_info(self, job: Job, now: float, include_history: bool = False) -> pb.JobInfo:
        history, tracker = job.history, job.tracker
        info = pb.JobInfo(
            job_id=job.job_id, name=job.name, state=job.state, reason=job.reason,
            spec_yaml=job.spec_yaml, created_ms=_unix_ms(job.created, now),
            ended_ms=_unix_ms(job.ended, now) if job.ended is not None else 0,
            step=history.step, max_steps=job.spec["stop"]["max_steps"],
            loss=history.latest_loss(job.workers), metric=tracker.metric,
            has_eval=tracker.has_eval, metric_value=tracker.latest or 0.0,
            best_metric=tracker.best or 0.0, best_step=tracker.best_step,
            # A sum of what workers reported: kept within int64 so that no report can make
            # this job unlistable (a value out of range fails the whole reply).
            steps_per_s=history.steps_per_s(now), samples=min(history.samples, INT64_MAX),
            servers=job.servers, epoch=job.epoch, resume_from=job.resume_from,
            rollback_id=job.rollback.id, rollback_version=job.rollback.version,
            final_version=job.ending.final_version if job.final else -1)
        for node_id in job.assigned_workers:
            stats = history.workers.get(node_id)
            info.workers.add(
                node_id=node_id, rank=job.rank(node_id), alive=node_id in job.workers,
                step=max(stats.step, 0) if stats else 0, loss=stats.loss if stats else 0.0,
                steps_per_s=stats.meter.rate(now) if stats else 0.0)
        if job.shard_map is not None:
            info.shard_map.CopyFrom(job.shard_map)
        if job.layout is not None:
            info.layout.CopyFrom(job.layout)
        if include_history:
            info.losses.extend(pb.LossPoint(step=s, loss=v) for s, v in history.losses)
            info.evals.extend(pb.EvalPoint(step=e.step, metric=e.metric, value=e.value,
                                           loss=e.loss) for e in history.evals)
        return info


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Ends the call with `code`; the message is cut to MAX_ERROR characters (it may echo an
    id or value the caller sent, of any length)."""
    context.abort(code, _cut(message, MAX_ERROR))
    raise AssertionError("context.abort returned")


def _required(value: str, name: str) -> str:
    if not value:
        raise ValueError(f"{name} is required")
    return value


def _wait_ms(value: int, name: str) -> int:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _unix_ms(t: float, now: float) -> int:
    """Unix milliseconds of monotonic time t, given that monotonic `now` is this instant."""
    return int((time.time() - (now - t)) * 1000)
