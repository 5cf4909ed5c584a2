"""Whether a sync worker taking a rollback finds its shards back (docs/architecture.md,
"Failures"): every shard at one version, the rollback's or a later one, each having applied
the rollback. A shard still at the rollback's version may not have applied it yet: when it
does, it may load its checkpoint again (dynamic tables) and drop what was pushed to it
meanwhile. A later version comes from this worker's pushes of a step computed before it
learned of the rollback, reaching shards that had already rolled back: they closed the round
there, and no shard will be at the rollback's version again.
No gRPC of its own: the caller pulls the versions and gives the call that asks the shards for
their ShardInfo."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import grpc

from shardps.proto import ps_pb2

logger = logging.getLogger(__name__)


def together(version: int, versions: Sequence[int]) -> bool:
    """Every shard's pull answered one same version, the rollback's (`version`) or later:
    worth asking whether each has applied the rollback (`settled`)."""
    return bool(versions) and len(set(versions)) == 1 and versions[0] >= version


def settled(version: int, rollback_id: int, indices: Sequence[int], versions: Sequence[int],
            infos: Mapping[int, ps_pb2.ShardInfo]) -> bool:
    """Whether shards `indices`, whose pulls answered `versions`, are back from the rollback
    (`rollback_id`, to `version`): all at one version, `version` or later, and each shard's
    ShardInfo (`infos`, by shard index) shows that version and exactly this rollback applied.

    A shard that has not applied it yet rolls back when it does, so the worker must keep
    waiting for it; one that applied a newer rollback belongs to that one, which the worker
    takes next.
    """
    if not together(version, versions) or len(indices) != len(versions):
        return False
    for index, pulled in zip(indices, versions, strict=True):
        info = infos.get(index)
        if info is None or info.rollback_id != rollback_id or info.version != pulled:
            return False
    return True


def back(job_id: str, version: int, rollback_id: int, indices: Sequence[int],
         versions: Sequence[int], ask: Callable[[], Mapping[int, ps_pb2.ShardInfo]]) -> bool:
    """Whether shards `indices`, whose pulls answered `versions`, are back from the rollback:
    `together`, then `settled` on what `ask()` answers (a failed ask is a no: the caller polls
    again). Logs the version training goes on from."""
    if not together(version, versions):
        return False
    try:
        infos = ask()
    except grpc.RpcError as exc:
        logger.debug("job %s: GetShardInfo failed (%s)", job_id, exc)
        return False
    if not settled(version, rollback_id, indices, versions, infos):
        return False
    if versions[0] == version:
        logger.info("job %s: every shard is back at version %d", job_id, version)
    else:
        logger.warning("job %s: every shard applied rollback %d and is at version %d, past %d: "
                       "pushes this worker sent before it took the rollback closed rounds "
                       "there; going on from version %d", job_id, rollback_id, versions[0],
                       version, versions[0])
    return True
