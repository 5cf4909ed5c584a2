"""Submission and assignment: a job is validated and queued, then waiting jobs get servers
and workers (oldest first), running jobs short of workers take idle ones back (elastic), and
a resumed job waits for the servers that hold its checkpoints.

Pure: no gRPC, no clock of its own (`now` is monotonic seconds). Not thread-safe: called
through JobTable under its owner's lock. The rules are docs/architecture.md, "Job life cycle"
1-2 and "Failures".
"""

from __future__ import annotations

import logging
import secrets

from shardps.proto import common_pb2, names
from shardps.proto.spec import JobSpec, NormalisedSpec, normalise
from shardps.proto.states import state_name

from .history import JobHistory
from .job import PENDING, RUNNING, Job, JobStateError, UnknownJobError
from .jobstore import JobStore
from .membership import Membership
from .recovery import joiners, resume_servers

log = logging.getLogger(__name__)


def submit(store: JobStore, spec_yaml: str | NormalisedSpec, membership: Membership,
           now: float, resume_from: str, max_points: int) -> Job:
    """Validates and queues a job, then schedules (JobTable.submit says the rules).

    Raises:
        SpecError, UnknownJobError, JobStateError, ValueError: as JobTable.submit.
    """
    normalised = normalise(spec_yaml) if isinstance(spec_yaml, str) else spec_yaml
    spec = normalised.spec
    if resume_from:
        _check_resumable(store, resume_from, spec, membership)
    job_id = f"{spec['name']}-{secrets.token_hex(3)}"
    while job_id in store.all:
        job_id = f"{spec['name']}-{secrets.token_hex(3)}"
    job = Job(job_id, spec, now, history=JobHistory(max_points),
              resume_from=resume_from, spec_yaml=normalised.text)
    store.add(job)
    log.info("job %s submitted (needs %d servers, %d workers)", job_id,
             spec["cluster"]["servers"], spec["cluster"]["workers"])
    schedule(store, membership, now)
    return job


def schedule(store: JobStore, membership: Membership, now: float) -> list[Job]:
    """Gives nodes to PENDING jobs that have none, oldest first; returns those assigned.

    A job gets `cluster.servers` alive servers (fewest hosted jobs first, then by id) and
    `cluster.workers` idle alive workers (by id; ranks follow). A job that cannot be
    served waits without holding nodes, so a later smaller job may start before it. Then
    running jobs that lost workers take idle ones back.
    """
    waiting = [j for j in store.active.values() if j.state == PENDING and not j.servers]
    short = [j for j in store.active.values()
             if j.state == RUNNING and len(j.workers) < j.spec["cluster"]["workers"]
             and not store.awaiting.intersection(j.workers)]
    if not waiting and not short:
        return []
    servers = membership.alive(common_pb2.ROLE_SERVER)
    load = {s.node_id: store.hosted(s.node_id) for s in servers}
    busy = store.busy_workers()
    idle = [w.node_id for w in membership.alive(common_pb2.ROLE_WORKER)
            if w.node_id not in busy]
    assigned = []
    for job in waiting:
        if _assign(store, job, membership, load, idle, now):
            idle = idle[len(job.workers):]
            assigned.append(job)
    for job in short:
        idle = _refill(job, idle)
    return assigned


def _assign(store: JobStore, job: Job, membership: Membership, load: dict[str, int],
            idle: list[str], now: float) -> bool:
    """Gives a waiting job its servers and the first of the `idle` workers, if there are
    enough (updating `load`); else records why it waits. Returns whether it was assigned."""
    need_servers = job.spec["cluster"]["servers"]
    need_workers = job.spec["cluster"]["workers"]
    resumed = None
    if job.resume_from:  # the servers holding its checkpoints, or wait for them
        resumed, why = _resume_servers(store, job, membership)
        if resumed is None:
            job.reason = why
            return False
    if len(load) < need_servers or len(idle) < need_workers:
        job.reason = (f"waiting for {need_servers} servers and {need_workers} workers "
                      f"(have {len(load)}, {len(idle)})")
        return False
    chosen = resumed or sorted(load, key=lambda s: (load[s], s))[:need_servers]
    for server_id in chosen:
        load[server_id] += 1
    job.servers = chosen
    job.workers = idle[:need_workers]
    job.assigned_workers = list(job.workers)
    job.epoch = 1
    job.assigned_at = now
    job.reason = "initialising"
    log.info("job %s assigned: servers %s, workers %s", job.job_id,
             ",".join(job.servers), ",".join(job.workers))
    return True


def _refill(job: Job, idle: list[str]) -> list[str]:
    """Elastic: a running job that lost workers takes idle ones back, at the end of its
    ranks (the others keep theirs). Returns the workers still idle."""
    joining = joiners(job.spec, job.workers, idle)
    if not joining:
        return idle
    job.workers += joining
    job.assigned_workers += [w for w in joining if w not in job.assigned_workers]
    job.epoch += 1
    log.info("job %s: worker(s) %s joined: %d workers, epoch %d", job.job_id,
             ",".join(joining), len(job.workers), job.epoch)
    return [w for w in idle if w not in joining]


def _holders(job_id: str, membership: Membership) -> dict[int, list[str]]:
    """Shard index -> the nodes that report holding checkpoints of that shard of `job_id`."""
    holders: dict[int, list[str]] = {}
    for node in membership.nodes():
        for stored_job, index in node.stored:
            if stored_job == job_id:
                holders.setdefault(index, []).append(node.node_id)
    return holders


def _check_resumable(store: JobStore, old_id: str, spec: JobSpec,
                     membership: Membership) -> None:
    old = store.all.get(old_id)
    if old is None:
        holders = _holders(old_id, membership)
        if not holders:
            raise UnknownJobError(f"unknown job {names.shown(old_id)}: no server reports "
                                  "checkpoints of it")
        shards = max(holders) + 1
    else:
        if not old.final:
            raise JobStateError(f"job {old_id} is still {state_name(old.state)}; cancel it "
                                "before resuming it")
        if old.layout is None:
            raise JobStateError(f"job {old_id} never had weights: nothing to resume")
        shards = len(old.shard_map.shards) if old.shard_map is not None else len(old.servers)
    # A resumed job puts shard i on a server holding its checkpoints, one shard per server.
    if spec["cluster"]["servers"] != shards:
        raise ValueError(f"cluster.servers: must be {shards}, the shard count of job "
                         f"{old_id}, to resume it")
    if spec["cluster"].get("shards", shards) != shards:
        raise ValueError(f"cluster.shards: must be {shards}, the shard count of job "
                         f"{old_id}, to resume it")


def _resume_servers(store: JobStore, job: Job,
                    membership: Membership) -> tuple[list[str] | None, str]:
    old = store.all.get(job.resume_from)
    return resume_servers(job.spec["cluster"]["servers"], old.servers if old else [],
                          _holders(job.resume_from, membership),
                          [s.node_id for s in membership.alive(common_pb2.ROLE_SERVER)])
