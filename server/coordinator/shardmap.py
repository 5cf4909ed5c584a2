"""Shard maps: the split of a job's flat fp32 vector into contiguous ranges (shards), and
which server holds each (shard i on server i mod the server count)."""

from __future__ import annotations

from collections.abc import Sequence

from shardps.proto import common_pb2


def split_ranges(total: int, n: int) -> list[tuple[int, int]]:
    """Splits [0, total) into n contiguous (offset, length) ranges balanced by bytes.

    Every element is fp32, so balancing bytes is balancing elements: lengths differ by at
    most one, the longer ranges first.

    Raises:
        ValueError: n < 1, or fewer elements than ranges (a shard may not be empty).
    """
    if n < 1:
        raise ValueError(f"need at least one shard, got {n}")
    if total < n:
        raise ValueError(f"a layout of {total} elements cannot be split into {n} shards "
                         "(a shard may not be empty); use fewer shards and servers")
    base, extra = divmod(total, n)
    ranges = []
    offset = 0
    for i in range(n):
        length = base + (1 if i < extra else 0)
        ranges.append((offset, length))
        offset += length
    return ranges


def build_shard_map(total: int, servers: Sequence[tuple[str, str]], shards: int = 0,
                    version: int = 1) -> common_pb2.ShardMap:
    """The shard map of `total` elements in `shards` shards (0: one per server) over servers
    given as (node_id, address) pairs: shard i on server i mod len(servers).

    Raises:
        ValueError: as split_ranges, or fewer shards than servers.
    """
    shards = shards or len(servers)
    if shards < len(servers):
        raise ValueError(f"{shards} shards cannot cover {len(servers)} servers")
    shard_map = common_pb2.ShardMap(version=version)
    for index, (offset, length) in enumerate(split_ranges(total, shards)):
        server_id, address = servers[index % len(servers)]
        shard_map.shards.add(index=index, server_id=server_id, address=address,
                             offset=offset, length=length)
    return shard_map
