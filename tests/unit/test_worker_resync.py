"""worker/resync.py: when a sync worker taking a rollback finds its shards back."""

from shardps.proto import ps_pb2
from shardps.worker import resync


def infos(*pairs: tuple[int, int]) -> dict[int, ps_pb2.ShardInfo]:
    """ShardInfo by index from (version, rollback_id) per shard 0, 1, ..."""
    return {i: ps_pb2.ShardInfo(shard_index=i, version=v, rollback_id=r)
            for i, (v, r) in enumerate(pairs)}


def test_back_at_the_rollbacks_version_only_when_every_shard_is_there():
    assert resync.back_at(40, [40, 40])
    assert not resync.back_at(40, [40, 41])
    assert not resync.back_at(40, [])


def test_settled_past_needs_one_version_above_and_this_rollback_applied_everywhere():
    assert resync.settled_past(40, 1, [0, 1], [41, 41], infos((41, 1), (41, 1)))
    # A shard that has not applied rollback 1 yet will go back to 40 when it does.
    assert not resync.settled_past(40, 1, [0, 1], [41, 41], infos((41, 1), (41, 0)))
    # One that applied a newer rollback belongs to that one.
    assert not resync.settled_past(40, 1, [0, 1], [41, 41], infos((41, 1), (41, 2)))
    # Moved on since the pull, missing, or not all at one version above 40.
    assert not resync.settled_past(40, 1, [0, 1], [41, 41], infos((41, 1), (42, 1)))
    assert not resync.settled_past(40, 1, [0, 1], [41, 41], infos((41, 1)))
    assert not resync.settled_past(40, 1, [0, 1], [41, 42], infos((41, 1), (42, 1)))
    assert not resync.settled_past(40, 1, [0, 1], [40, 40], infos((40, 1), (40, 1)))
    assert not resync.together_past(40, [39, 39])
