"""What a server's RegisterNode and Heartbeat say of its shards (restored from checkpoints,
frozen after a job's end, joining copies caught up), applied to the job table and counted in
the metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from shardps.proto import coordinator_pb2 as pb

from . import rereplication
from .job import UnknownJobError
from .jobs import JobTable
from .metrics import CoordinatorMetrics

log = logging.getLogger(__name__)


def apply(jobs: JobTable, metrics: CoordinatorMetrics, node_id: str,
          restored: Sequence[pb.ShardVersion], frozen: Sequence[pb.ShardVersion]) -> None:
    """Applies server `node_id`'s shard reports. Caller holds the servicer's lock."""
    for r in restored:
        if not jobs.replica_holds(r.job_id, node_id, r.shard_index):
            log.info("server %s restored job %s shard %d at version %d, but is no longer one "
                     "of its replicas (it failed over): nothing is lost or rolled back",
                     node_id, r.job_id, r.shard_index, r.version)
            continue
        log.warning("server %s restored job %s shard %d from its checkpoint at version %d "
                    "(%d update(s) past it lost)", node_id, r.job_id, r.shard_index,
                    r.version, r.lost_updates)
        metrics.shard_restores.inc()
        metrics.lost_updates.inc(max(0, r.lost_updates))
        if jobs.shard_restored(r.job_id, r.shard_index, r.version, r.lost_updates):
            metrics.rollbacks.inc()
    if frozen:
        jobs.shards_frozen(node_id, [(f.job_id, f.shard_index, f.version) for f in frozen])


def caught_up(jobs: JobTable, node_id: str, reports: Sequence[pb.ShardVersion]) -> None:
    """Joining copies on server `node_id` caught up with their primaries (`version` = join
    epoch): each becomes a backup (rereplication.copy_caught_up; a report of a join that is
    no longer current changes nothing). Caller holds the servicer's lock."""
    for r in reports:
        try:
            job = jobs.get(r.job_id)
        except UnknownJobError:
            continue
        if not job.final:
            try:
                rereplication.copy_caught_up(job, r.shard_index, node_id, r.version)
            except rereplication.CopyError as exc:
                log.info("server %s: caught-up report ignored: %s", node_id, exc)
