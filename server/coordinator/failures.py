"""What node events do to the jobs: a lost worker is dropped and the rest re-ranked, a
re-registered node leaves its old incarnation's job or moves its shards, a restored shard may
roll a sync job back, and leases and initialisations that run out are applied.

Pure: no gRPC, no clock of its own (`now` is monotonic seconds). Not thread-safe: called
through JobTable under its owner's lock. The rules for rollbacks, rejoins and resumed jobs are
in recovery.py; docs/architecture.md, "Failures".
"""

from __future__ import annotations

import logging

from shardps.proto import common_pb2
from shardps.proto.states import state_name

from . import replicas, rereplication, settling
from .convergence import Verdict
from .job import COMPLETED, FAILED, RUNNING, finished_reason
from .jobstore import JobStore
from .membership import Membership, Node
from .recovery import shard_restored as rollback_on_restore

log = logging.getLogger(__name__)


def sweep(store: JobStore, membership: Membership, now: float,
          init_timeout_s: float) -> list[Node]:
    """Expires leases (dropping dead workers from their jobs), fails jobs assigned longer
    than `init_timeout_s` ago and not activated, and settles ended jobs whose late reports
    no longer count, and gives replicated shards short of copies a joining copy
    (rereplication.rereplicate). Returns the nodes that just died."""
    dead = membership.expire(now)
    for node in dead:
        node_lost(store, node.node_id, now, "lease expired")
    for job in list(store.active.values()):
        if job.initialising and now - (job.assigned_at or now) > init_timeout_s:
            store.end(job, Verdict(FAILED, "initialisation timed out"), now)
    settling.settle_due(store, now)

    def alive(node_id: str) -> str | None:
        node = membership.find(node_id)
        return node.address if node is not None and node.alive else None

    rereplication.rereplicate(list(store.active.values()), alive, store.joins, now)
    return dead


def node_lost(store: JobStore, node_id: str, now: float, why: str) -> None:
    """A worker is gone: every non-final job it worked on drops it, bumps its epoch and
    re-ranks the rest in their order; a job left without workers FAILS, and one whose
    remaining workers have all finished (the lost one was the rank 0 they were waiting for)
    COMPLETES. A lost server's replicated shards fail over (replicas.server_lost)."""
    store.awaiting.discard(node_id)
    replicas.server_lost(list(store.active.values()), node_id)
    for job in list(store.active.values()):
        if node_id not in job.workers:
            continue
        job.workers.remove(node_id)
        job.epoch += 1
        log.info("job %s lost worker %s (%s): %d left, epoch %d", job.job_id, node_id, why,
                 len(job.workers), job.epoch)
        if not job.workers:
            store.end(job, Verdict(FAILED, "all workers lost"), now)
        elif job.all_finished():
            store.end(job, Verdict(COMPLETED, finished_reason(job.spec)), now)
        else:
            job.history.settle(job.workers)


def node_registered(store: JobStore, node: Node, now: float) -> None:
    """Applies a re-registration: the previous incarnation of a worker has left its job; the
    previous incarnation of a server is lost to its replicated shards (replicas.server_lost:
    a restart faster than the lease must not bring back its restored, older copy as a
    primary; it rejoins by transfer), and its shard maps get its new address."""
    if node.incarnation == 1:
        return
    if node.role == common_pb2.ROLE_WORKER:
        node_lost(store, node.node_id, now, "re-registered")
        return
    replicas.server_lost(list(store.active.values()), node.node_id)
    for job in store.all.values():  # ended ones too: their weights are exported from there
        if job.shard_map is None:
            continue
        moved = [s for s in job.shard_map.shards
                 if s.server_id == node.node_id and s.address != node.address]
        for shard in moved:
            shard.address = node.address
        if replicas.move_backups(job.shard_map, node.node_id, node.address):
            moved.append(common_pb2.ShardRange())  # counts as a move: the version goes up
        if moved:
            job.shard_map.version += 1
            log.info("job %s: server %s moved to %s (shard map version %d)", job.job_id,
                     node.node_id, node.address, job.shard_map.version)


def shard_restored(store: JobStore, job_id: str, index: int, version: int, lost: int) -> bool:
    """A server restored shard `index` of a job from its checkpoint at `version`.

    A running sync job rolls back (see recovery.shard_restored): its servers and workers
    learn the rollback from their heartbeats. Other modes go on; `lost` updates are gone.
    Returns True if a new rollback started.
    """
    job = store.all.get(job_id)
    if job is None:
        log.info("a server restored shard %d of job %s, unknown here", index, job_id)
        return False
    mode = job.spec["consistency"]["mode"]
    if rollback_on_restore(job.rollback, mode, job.state == RUNNING, version):
        log.warning("job %s: shard %d restored at version %d (%d updates past it lost): "
                    "rollback %d, every shard and worker goes back to version %d", job_id,
                    index, version, lost, job.rollback.id, job.rollback.version)
        return True
    log.warning("job %s (%s, %s): shard %d restored at version %d; %d update(s) lost",
                job_id, mode, state_name(job.state), index, version, lost)
    return False
