"""Replicated shards in the shard map: where a job's backups go, and failover when a server
is lost (docs/architecture.md, "Replicated shards").

A replicated shard's `ShardRange` names its primary (`server_id`, `address`), its backups in
promotion order (`backup_ids`, `backup_addresses`) and its `replica_epoch`. The coordinator
is the only one that changes them, and every change bumps the epoch, so no epoch ever has two
primaries of one shard.

Pure: no gRPC, no clock. Not thread-safe: called under the coordinator's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from shardps.proto import common_pb2

from .job import Job

log = logging.getLogger(__name__)


def place_backups(shard_map: common_pb2.ShardMap, servers: Sequence[tuple[str, str]],
                  replicas: int) -> None:
    """Gives shard i of a fresh map (shard i on server i mod n, for n servers) the backups on
    servers i+1, ..., i+replicas-1 (mod n), so each server holds as many backups of each
    layer as primaries. replicas = 1 leaves the map as it is (no backups, epoch 0)."""
    if replicas <= 1:
        return
    if replicas > len(servers):
        raise ValueError(f"{replicas} replicas need as many servers, have {len(servers)}")
    for shard in shard_map.shards:
        for k in range(1, replicas):
            server_id, address = servers[(shard.index + k) % len(servers)]
            shard.backup_ids.append(server_id)
            shard.backup_addresses.append(address)
        shard.replica_epoch = 1


def replicated(shard_map: common_pb2.ShardMap | None) -> bool:
    """Whether the map's shards carry replicas (a job with cluster.replicas > 1)."""
    return shard_map is not None and any(s.replica_epoch for s in shard_map.shards)


def server_lost(jobs: Iterable[Job], node_id: str) -> int:
    """A server is dead (lease expired or said goodbye): in every non-final replicated job,
    a shard it was primary of promotes its first backup, and a shard it backed up drops it;
    each such shard's replica epoch and the map's version go up. A shard with no backup left
    keeps its dead primary (the job waits for it, as without replicas). Returns how many
    primaries were promoted."""
    promoted = 0
    for job in jobs:
        if job.final or not replicated(job.shard_map):
            continue
        assert job.shard_map is not None
        changed = False
        for shard in job.shard_map.shards:
            if shard.server_id == node_id and shard.backup_ids:
                old = shard.server_id
                shard.server_id, shard.address = shard.backup_ids[0], shard.backup_addresses[0]
                del shard.backup_ids[0], shard.backup_addresses[0]
                promoted += 1
                shard.replica_epoch += 1
                changed = True
                log.warning("job %s shard %d: primary %s lost; backup %s promoted (replica "
                            "epoch %d, %d backup(s) left)", job.job_id, shard.index, old,
                            shard.server_id, shard.replica_epoch, len(shard.backup_ids))
            elif node_id in shard.backup_ids:
                k = list(shard.backup_ids).index(node_id)
                del shard.backup_ids[k], shard.backup_addresses[k]
                shard.replica_epoch += 1
                changed = True
                log.warning("job %s shard %d: backup %s lost (replica epoch %d, %d backup(s) "
                            "left)", job.job_id, shard.index, node_id, shard.replica_epoch,
                            len(shard.backup_ids))
            if node_id in shard.joining_ids:  # a joining copy (rereplication.py)
                k = list(shard.joining_ids).index(node_id)
                del shard.joining_ids[k], shard.joining_addresses[k], shard.joining_epochs[k]
                shard.replica_epoch += 1
                changed = True
                log.warning("job %s shard %d: joining copy %s lost (replica epoch %d)",
                            job.job_id, shard.index, node_id, shard.replica_epoch)
        if changed:
            job.shard_map.version += 1
    return promoted


def move_backups(shard_map: common_pb2.ShardMap, node_id: str, address: str) -> bool:
    """A restarted server registered at a new address: its backup (and joining) entries
    follow it. Returns whether anything moved."""
    moved = False
    for shard in shard_map.shards:
        for ids, addresses in ((shard.backup_ids, shard.backup_addresses),
                               (shard.joining_ids, shard.joining_addresses)):
            for k, copy in enumerate(ids):
                if copy == node_id and addresses[k] != address:
                    addresses[k] = address
                    moved = True
    return moved


def holds(shard_map: common_pb2.ShardMap | None, node_id: str, index: int) -> bool:
    """Whether `node_id` is still a replica (primary or backup) of shard `index`; always
    True for a job without replicas (its servers never leave the map)."""
    if not replicated(shard_map):
        return True
    assert shard_map is not None
    return any(s.index == index and (s.server_id == node_id or node_id in s.backup_ids
                                     or node_id in s.joining_ids)
               for s in shard_map.shards)
