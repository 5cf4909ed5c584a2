"""What a server's RegisterNode and Heartbeat say of its shards (restored from checkpoints,
frozen after a job's end), applied to the job table and counted in the metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from shardps.proto import coordinator_pb2 as pb

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
