"""The handshake with a job's rank-0 worker: it sends the model layout (and gets the shard
map), initialises every shard, then activates the job (PENDING -> RUNNING).

Pure: no gRPC, no clock. Not thread-safe: called through JobTable under its owner's lock. The
rules are docs/architecture.md, "Job life cycle" 3-4.
"""

from __future__ import annotations

import logging

from shardps.proto import common_pb2
from shardps.proto.layout import check_layout
from shardps.proto.states import state_name

from .job import RUNNING, Job, JobStateError
from .membership import Membership
from .replicas import place_backups
from .shardmap import build_shard_map

log = logging.getLogger(__name__)
SHOWN_TABLES = 4  # table names a refusal lists (a layout may name many)


def set_layout(job: Job, node_id: str, incarnation: int, layout: common_pb2.Layout,
               membership: Membership) -> common_pb2.ShardMap:
    """Stores the model layout from the job's rank-0 worker and returns the shard map
    (JobTable.set_layout says the rules and what it raises)."""
    require_rank0(job, node_id, incarnation, membership, "set the layout of")
    check_layout(layout)
    check_tables_allowed(job, layout)
    if job.layout is not None:
        if layout == job.layout:
            assert job.shard_map is not None
            return job.shard_map
        raise JobStateError(f"job {job.job_id} already has layout {job.layout.fingerprint} "
                            f"({job.layout.total} elements); got {layout.fingerprint} "
                            f"({layout.total} elements)")
    servers = [(s, membership.get(s).address) for s in job.servers]
    cluster = job.spec["cluster"]
    shard_map = build_shard_map(layout.total, servers, cluster.get("shards") or len(servers))
    place_backups(shard_map, servers, cluster.get("replicas", 1))
    job.layout = common_pb2.Layout()
    job.layout.CopyFrom(layout)
    job.shard_map = shard_map
    log.info("job %s layout %s: %d elements in %d shards over %d servers", job.job_id,
             layout.fingerprint, layout.total, len(shard_map.shards), len(job.servers))
    return shard_map


def check_tables_allowed(job: Job, layout: common_pb2.Layout) -> None:
    """Raises ValueError naming `cluster.replicas` for a model with embedding tables in a job
    with replicas: table rows are neither forwarded to backups nor transferred."""
    replicas = int(job.spec["cluster"].get("replicas", 1))
    if layout.tables and replicas > 1:
        raise ValueError(f"cluster.replicas: a model with embedding tables "
                         f"({shown_tables(layout)}) cannot have replicas yet: {replicas} > 1; "
                         f"use cluster.replicas: 1")


def shown_tables(layout: common_pb2.Layout) -> str:
    """The layout's table names for a message: the first few."""
    names = list(layout.tables[:SHOWN_TABLES])
    return ", ".join(names) + (f" and {len(layout.tables) - len(names)} more"
                               if len(layout.tables) > len(names) else "")


def activate(job: Job, node_id: str, incarnation: int, membership: Membership) -> common_pb2.JobState:
    """The rank-0 worker has initialised every shard: the job is RUNNING (a repeat is
    harmless). Returns the state (JobTable.activate says what it raises)."""
    require_rank0(job, node_id, incarnation, membership, "activate")
    if job.state == RUNNING:
        return job.state
    if job.layout is None:
        raise JobStateError(f"job {job.job_id} has no layout yet; call SetLayout first")
    job.state, job.reason = RUNNING, "training"
    log.info("job %s running (epoch %d, %d workers)", job.job_id, job.epoch, len(job.workers))
    return job.state


def require_rank0(job: Job, node_id: str, incarnation: int, membership: Membership,
                  action: str) -> None:
    """Raises unless the caller is the current incarnation of the job's rank-0 worker and
    the job is assigned and not final.

    Raises:
        UnknownNodeError, StaleNodeError: from membership.require.
        JobStateError: a final or unassigned job, or a caller that is not rank 0.
    """
    membership.require(node_id, incarnation)
    if job.final:
        raise JobStateError(f"job {job.job_id} has ended ({state_name(job.state)}: "
                            f"{job.reason})")
    if not job.servers:
        raise JobStateError(f"job {job.job_id} has no nodes yet ({job.reason})")
    if job.rank(node_id) != 0:
        raise JobStateError(f"only the rank-0 worker of job {job.job_id} "
                            f"({job.workers[0]}) may {action} it, not {node_id}")
