"""Whether a sync worker taking a rollback finds its shards back (docs/architecture.md,
"Failures"): every shard at exactly the rollback's version, or every shard at one later
version, each having applied the rollback first. The second happens when this worker's pushes
of a step, computed before it learned of the rollback, reached shards that had already rolled
back: they closed the round there, and no shard will ever be at the rollback's version again.
Pure: the caller pulls the versions and asks the shards for their ShardInfo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shardps.proto import ps_pb2


def back_at(version: int, versions: Sequence[int]) -> bool:
    """Every shard's pull answered exactly `version` (the rollback's)."""
    return bool(versions) and all(v == version for v in versions)


def together_past(version: int, versions: Sequence[int]) -> bool:
    """Every shard answered one same version above `version`: worth asking whether each has
    applied the rollback (`settled_past`)."""
    return bool(versions) and len(set(versions)) == 1 and versions[0] > version


def settled_past(version: int, rollback_id: int, indices: Sequence[int],
                 versions: Sequence[int], infos: Mapping[int, ps_pb2.ShardInfo]) -> bool:
    """Whether shards `indices`, whose pulls answered `versions`, are settled past the
    rollback (`rollback_id`, to `version`): all at one version above it, and each shard's
    ShardInfo (`infos`, by shard index) shows that version and exactly this rollback applied.

    A shard that has not applied it yet will load its checkpoint of `version` when it does
    (its version differs), so the worker must keep waiting for it; one that applied a newer
    rollback belongs to that one, which the worker takes next.
    """
    if not together_past(version, versions) or len(indices) != len(versions):
        return False
    for index, pulled in zip(indices, versions, strict=True):
        info = infos.get(index)
        if info is None or info.rollback_id != rollback_id or info.version != pulled:
            return False
    return True
