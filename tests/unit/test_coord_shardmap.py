"""Shard maps: contiguous, byte-balanced ranges over a job's servers."""

import pytest

from shardps.server.coordinator.shardmap import build_shard_map, split_ranges


@pytest.mark.parametrize("total, n", [(10, 3), (9, 3), (1, 1), (7, 7), (1_000_003, 4)])
def test_ranges_are_contiguous_balanced_and_longest_first(total, n):
    ranges = split_ranges(total, n)
    assert len(ranges) == n
    offset = 0
    for start, length in ranges:
        assert start == offset and length > 0
        offset += length
    assert offset == total
    lengths = [length for _, length in ranges]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)


def test_split_of_ten_over_three():
    assert split_ranges(10, 3) == [(0, 4), (4, 3), (7, 3)]


@pytest.mark.parametrize("total, n", [(2, 3), (0, 1), (5, 0)])
def test_empty_shards_are_refused(total, n):
    with pytest.raises(ValueError):
        split_ranges(total, n)


def test_shard_map_puts_shard_i_on_server_i():
    shard_map = build_shard_map(11, [("server-b", "h:2"), ("server-a", "h:1")])
    assert shard_map.version == 1
    got = [(s.index, s.server_id, s.address, s.offset, s.length) for s in shard_map.shards]
    assert got == [(0, "server-b", "h:2", 0, 6), (1, "server-a", "h:1", 6, 5)]


def test_more_shards_than_servers_go_round_robin():
    servers = [("server-b", "h:2"), ("server-a", "h:1")]
    shard_map = build_shard_map(11, servers, shards=5)
    got = [(s.index, s.server_id, s.offset, s.length) for s in shard_map.shards]
    assert got == [(0, "server-b", 0, 3), (1, "server-a", 3, 2), (2, "server-b", 5, 2),
                   (3, "server-a", 7, 2), (4, "server-b", 9, 2)]
    with pytest.raises(ValueError, match="1 shards cannot cover 2 servers"):
        build_shard_map(11, servers, shards=1)
