"""What the coordinator's replies show of its tables: a job as JobInfo (GetJob in full,
ListJobs as a bounded summary), a hosted job as ServerJobView (server heartbeats), a node as
NodeInfo (ListNodes).

Reads the core, changes nothing; callers hold the servicer's lock.
"""

from __future__ import annotations

import time

from shardps.proto import common_pb2
from shardps.proto import coordinator_pb2 as pb

from .job import Job
from .jobs import JobTable
from .membership import Membership, Node
from .replicas import replicated
from .resharding import progress

INT64_MAX = 2**63 - 1


def job_info(job: Job, now: float, include_history: bool = False) -> pb.JobInfo:
    """A job as GetJob shows it: the summary, its spec and layout, and (with
    `include_history`) its loss points and evaluations; `now` is monotonic seconds."""
    info = job_summary(job, now)
    info.spec_yaml = job.spec_yaml
    if job.layout is not None:
        info.layout.CopyFrom(job.layout)
    if include_history:
        info.losses.extend(pb.LossPoint(step=s, loss=v) for s, v in job.history.losses)
        info.evals.extend(pb.EvalPoint(step=e.step, metric=e.metric, value=e.value,
                                       loss=e.loss) for e in job.history.evals)
    return info


def job_summary(job: Job, now: float) -> pb.JobInfo:
    """A job as ListJobs shows it: everything but its spec, layout and history, whose size
    only the job's submitter and its model bound (a spec is up to 64 KiB, a layout names
    every tensor): a list of every job with those would outgrow gRPC's message limit after a
    few hundred jobs and fail for every caller. GetJob has them."""
    history, tracker = job.history, job.tracker
    info = pb.JobInfo(
        job_id=job.job_id, name=job.name, state=job.state, reason=job.reason,
        created_ms=_unix_ms(job.created, now),
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
    if job.reshard is not None:
        info.reshard.CopyFrom(progress(job.reshard, now))
    return info


def server_views(jobs: JobTable, membership: Membership, node_id: str) -> list[pb.ServerJobView]:
    """What a server must know of each job it hosts: state, live workers with their
    incarnations (it fences the others), the job's last rollback and, for a replicated job,
    its shard map (which replica of each shard is the primary, at which epoch)."""
    views = []
    for job in jobs.server_jobs(node_id):
        incarnations = [n.incarnation if (n := membership.find(w)) else 0 for w in job.workers]
        view = pb.ServerJobView(
            job_id=job.job_id, state=job.state, epoch=job.epoch, live_workers=job.workers,
            live_incarnations=incarnations, rollback_id=job.rollback.id,
            rollback_version=job.rollback.version)
        if job.final and job.ending.final_version >= 0:
            view.final_version = job.ending.final_version
        if replicated(job.shard_map):
            assert job.shard_map is not None
            view.shard_map.CopyFrom(job.shard_map)
        views.append(view)
    return views


def node_info(node: Node, jobs: JobTable, now: float) -> pb.NodeInfo:
    """A node as ListNodes shows it: a worker with its current job, a server with the jobs
    whose shard maps name it."""
    info = pb.NodeInfo(
        node_id=node.node_id, role=node.role, address=node.address,
        state=pb.NODE_STATE_ALIVE if node.alive else pb.NODE_STATE_DEAD,
        incarnation=node.incarnation, last_seen_ms_ago=int((now - node.last_seen) * 1000),
        metrics_address=node.metrics_address, device=node.device, hostname=node.hostname)
    if node.role == common_pb2.ROLE_WORKER:
        job = jobs.assignment(node.node_id)
        info.job_id = job.job_id if job else ""
    else:
        info.jobs.extend(j.job_id for j in jobs.server_jobs(node.node_id))
    return info


def assignment(job: Job, node_id: str) -> pb.WorkerAssignment:
    """A worker's place in its job, as its heartbeat reply carries it."""
    return pb.WorkerAssignment(
        job_id=job.job_id, rank=job.rank(node_id), world_size=len(job.workers),
        epoch=job.epoch, rollback_id=job.rollback.id, rollback_version=job.rollback.version)


def _unix_ms(t: float, now: float) -> int:
    """Unix milliseconds of monotonic time t, given that monotonic `now` is this instant."""
    return int((time.time() - (now - t)) * 1000)
