"""Copies of a running job's shards that come and go (docs/architecture.md, "Catch-up by
transfer"): a server added as a *joining* copy, made a backup once it reports itself caught
up, a backup promoted to primary, a copy dropped; and re-replication, which adds a joining
copy wherever a shard has fewer copies than the job's `cluster.replicas`.

Every change bumps the shard's replica epoch and the map's version (the coordinator is the
only writer of the map, so no epoch has two primaries). These are the building blocks of
resharding too (add a joining copy on the target, wait until it is a backup, promote it, drop
the source), which is why they also work for a job with `replicas: 1` (epoch 0 then becomes
1: the shard is replicated while it has a second copy).

Pure: no gRPC; `now` is monotonic seconds passed in. Not thread-safe: called under the
coordinator's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shardps.proto import common_pb2

from .job import RUNNING, Job

log = logging.getLogger(__name__)

# A joining copy not caught up within this long is dropped (its transfer failed or stalled);
# re-replication adds one again at its next sweep.
JOIN_TIMEOUT_S = 120.0


class CopyError(ValueError):
    """A change of a shard's copies that does not apply (the message says why)."""


def _shard(job: Job, index: int) -> common_pb2.ShardRange:
    if job.shard_map is None or not 0 <= index < len(job.shard_map.shards):
        raise CopyError(f"job {job.job_id} has no shard {index}")
    return job.shard_map.shards[index]


def copies(shard: common_pb2.ShardRange) -> list[str]:
    """Every server holding a copy of the shard: primary, backups, joining copies."""
    return [shard.server_id, *shard.backup_ids, *shard.joining_ids]


def _bump(job: Job, shard: common_pb2.ShardRange) -> None:
    shard.replica_epoch += 1
    assert job.shard_map is not None
    job.shard_map.version += 1


def add_copy(job: Job, index: int, server_id: str, address: str) -> int:
    """Adds `server_id` as a joining copy of shard `index`; returns its join epoch (the
    shard's new replica epoch), which names this join from then on."""
    shard = _shard(job, index)
    if server_id in copies(shard):
        raise CopyError(f"server {server_id} already holds job {job.job_id} shard {index}")
    _bump(job, shard)
    shard.joining_ids.append(server_id)
    shard.joining_addresses.append(address)
    shard.joining_epochs.append(shard.replica_epoch)
    log.info("job %s shard %d: %s joins as a copy (replica epoch %d; primary %s sends it the "
             "shard)", job.job_id, index, server_id, shard.replica_epoch, shard.server_id)
    return shard.replica_epoch


def copy_caught_up(job: Job, index: int, server_id: str, join_epoch: int) -> bool:
    """A joining copy reports itself caught up with its primary: it becomes the last backup.
    Returns False (nothing changes) unless it is still joining under that join epoch."""
    shard = _shard(job, index)
    joining = list(zip(shard.joining_ids, shard.joining_epochs, strict=True))
    if (server_id, join_epoch) not in joining:
        return False
    k = joining.index((server_id, join_epoch))
    address = shard.joining_addresses[k]
    del shard.joining_ids[k], shard.joining_addresses[k], shard.joining_epochs[k]
    shard.backup_ids.append(server_id)
    shard.backup_addresses.append(address)
    _bump(job, shard)
    log.info("job %s shard %d: %s caught up; a backup now (replica epoch %d, %d backup(s))",
             job.job_id, index, server_id, shard.replica_epoch, len(shard.backup_ids))
    return True


def promote(job: Job, index: int, server_id: str) -> None:
    """Makes backup `server_id` the shard's primary; the old primary becomes its first
    backup (drop it with drop_copy to move the shard)."""
    shard = _shard(job, index)
    if server_id not in shard.backup_ids:
        raise CopyError(f"server {server_id} is not a backup of job {job.job_id} shard {index}")
    k = list(shard.backup_ids).index(server_id)
    address = shard.backup_addresses[k]
    del shard.backup_ids[k], shard.backup_addresses[k]
    shard.backup_ids.insert(0, shard.server_id)
    shard.backup_addresses.insert(0, shard.address)
    shard.server_id, shard.address = server_id, address
    _bump(job, shard)
    log.info("job %s shard %d: %s promoted to primary (replica epoch %d)", job.job_id, index,
             server_id, shard.replica_epoch)


def drop_copy(job: Job, index: int, server_id: str) -> None:
    """Removes a backup or joining copy of the shard (never its primary: promote another
    copy first)."""
    shard = _shard(job, index)
    if server_id == shard.server_id:
        raise CopyError(f"server {server_id} is the primary of job {job.job_id} shard {index}; "
                        "promote another copy first")
    if server_id in shard.backup_ids:
        k = list(shard.backup_ids).index(server_id)
        del shard.backup_ids[k], shard.backup_addresses[k]
    elif server_id in shard.joining_ids:
        k = list(shard.joining_ids).index(server_id)
        del shard.joining_ids[k], shard.joining_addresses[k], shard.joining_epochs[k]
    else:
        raise CopyError(f"server {server_id} holds no copy of job {job.job_id} shard {index}")
    _bump(job, shard)
    log.info("job %s shard %d: copy on %s dropped (replica epoch %d)", job.job_id, index,
             server_id, shard.replica_epoch)


@dataclass
class Joins:
    """When each joining copy was first seen (job, shard, server, join epoch) -> monotonic s;
    the clock of JOIN_TIMEOUT_S. Not persisted: after a coordinator restart a join's clock
    starts again."""

    since: dict[tuple[str, int, str, int], float] = field(default_factory=dict)

    def expire(self, job: Job, now: float, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Drops the job's joining copies older than `timeout_s`; forgets ended joins."""
        assert job.shard_map is not None
        live = set()
        for shard in list(job.shard_map.shards):
            for server_id, epoch in list(zip(shard.joining_ids, shard.joining_epochs,
                                             strict=True)):
                key = (job.job_id, shard.index, server_id, epoch)
                live.add(key)
                if now - self.since.setdefault(key, now) > timeout_s:
                    log.warning("job %s shard %d: %s did not catch up within %.0f s; dropped",
                                job.job_id, shard.index, server_id, timeout_s)
                    drop_copy(job, shard.index, server_id)
                    live.discard(key)
        for key in [k for k in self.since if k[0] == job.job_id and k not in live]:
            del self.since[key]


def rereplicate(jobs: Iterable[Job], alive: Callable[[str], str | None], joins: Joins,
                now: float) -> int:
    """For every RUNNING job: expires stalled joins; in a replicated one, gives each shard with
    fewer copies than `cluster.replicas` a joining copy on a live server of the job that
    holds none of it (the one holding the fewest of the job's copies first). `alive(id)` is
    a live server's address, None for a dead one. Returns how many copies were added."""
    added = 0
    for job in jobs:
        want = int(job.spec["cluster"].get("replicas", 1))
        if job.state != RUNNING or job.shard_map is None:
            continue
        joins.expire(job, now)  # also the joins of a shard being moved (replicas: 1)
        if want <= 1 or not any(s.replica_epoch for s in job.shard_map.shards):
            continue
        for shard in job.shard_map.shards:
            if alive(shard.server_id) is None:  # its last copy is dead: wait for it
                continue
            for _ in range(want - len(copies(shard))):
                target = _candidate(job, shard, alive)
                if target is None:
                    break
                add_copy(job, shard.index, target, alive(target) or "")
                joins.since[(job.job_id, shard.index, target, shard.replica_epoch)] = now
                added += 1
    return added


def _candidate(job: Job, shard: common_pb2.ShardRange,
               alive: Callable[[str], str | None]) -> str | None:
    assert job.shard_map is not None
    held = copies(shard)
    free = [s for s in job.servers if s not in held and alive(s) is not None]
    if not free:
        return None
    load = {s: sum(copies(x).count(s) for x in job.shard_map.shards) for s in free}
    return min(free, key=lambda s: (load[s], job.servers.index(s)))
