"""Whether a sync worker taking a rollback finds its shards back (docs/architecture.md,
"Failures"): every shard at one version, the rollback's or a later one, each having applied
the rollback. A shard still at the rollback's version may not have applied it yet: when it
does, it may load its checkpoint again (dynamic tables) and drop what was pushed to it
meanwhile. A later version comes from this worker's pushes of a step computed before it
learned of the rollback, reaching shards that had already rolled back: they closed the round
there, and no shard will be at the rollback's version again.
Pure: the caller pulls the versions and asks the shards for their ShardInfo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shardps.proto import ps_pb2


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
