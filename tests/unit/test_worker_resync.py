"""worker/resync.py: when a sync worker taking a rollback finds its shards back."""

from shardps.proto import ps_pb2
from shardps.worker import resync


def infos(*pairs: tuple[int, int]) -> dict[int, ps_pb2.ShardInfo]:
    """ShardInfo by index from (version, rollback_id) per shard 0, 1, ..."""
    return {i: ps_pb2.ShardInfo(shard_index=i, version=v, rollback_id=r)
            for i, (v, r) in enumerate(pairs)}


def test_back_at_the_rollbacks_version_once_every_shard_applied_it():
    assert resync.settled(40, 1, [0, 1], [40, 40], infos((40, 1), (40, 1)))
    # Shard 1 is at 40 but has not applied rollback 1 yet: it may still load its checkpoint.
    assert not resync.settled(40, 1, [0, 1], [40, 40], infos((40, 1), (40, 0)))
    assert not resync.together(40, [40, 41]) and not resync.together(40, [])


def test_past_the_rollbacks_version_needs_one_version_and_this_rollback_applied_everywhere():
    assert resync.settled(40, 1, [0, 1], [41, 41], infos((41, 1), (41, 1)))
    # A shard that has not applied rollback 1 yet will go back to 40 when it does.
    assert not resync.settled(40, 1, [0, 1], [41, 41], infos((41, 1), (41, 0)))
    # One that applied a newer rollback belongs to that one.
    assert not resync.settled(40, 1, [0, 1], [41, 41], infos((41, 1), (41, 2)))
    # Moved on since the pull, missing, or not all at one version from 40 on.
    assert not resync.settled(40, 1, [0, 1], [41, 41], infos((41, 1), (42, 1)))
    assert not resync.settled(40, 1, [0, 1], [41, 41], infos((41, 1)))
    assert not resync.settled(40, 1, [0, 1], [41, 42], infos((41, 1), (42, 1)))
    assert not resync.settled(40, 1, [0, 1], [39, 39], infos((39, 1), (39, 1)))
