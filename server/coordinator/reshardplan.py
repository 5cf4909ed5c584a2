"""The plan of a reshard (docs/architecture.md, "Resharding"): which servers a job's shards
go to when it is spread over N servers, and the fewest shard copies to move to get there.

Shards are the unit that moves; their boundaries never change. A move takes one copy of one
shard from a server to another; resharding.py carries the moves out.

Pure: no gRPC, no clock, no job table. Not thread-safe (plain values in, plain values out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PlanError(ValueError):
    """A reshard that cannot be done (the message names the field `servers`)."""


@dataclass(frozen=True)
class Move:
    """One copy of shard `index` moves from `source` to `target`; `primary`: the copy is the
    shard's primary (the target is promoted before the source is dropped)."""

    index: int
    source: str
    target: str
    primary: bool


def choose_servers(current: Sequence[str], n: int, free: Sequence[str], *, shards: int,
                   replicas: int) -> list[str]:
    """The servers a job runs on after a reshard to `n`: the first n of `current` (draining
    the highest-numbered), or all of `current` and then the first of `free` (alive servers
    not in the job, best first) to make n.

    Raises:
        PlanError: n < 1, n > shards, n < replicas, or not enough free servers.
    """
    if n < 1:
        raise PlanError(f"servers: must be >= 1, got {n}")
    if n > shards:
        raise PlanError(f"servers: {n} > the job's {shards} shards (cluster.shards); a shard "
                        "never splits, so a job runs on at most as many servers as it has shards")
    if n < replicas:
        raise PlanError(f"servers: {n} < cluster.replicas {replicas}; each copy of a shard "
                        "needs a server of its own")
    if n <= len(current):
        return list(current[:n])
    need = n - len(current)
    if need > len(free):
        raise PlanError(f"servers: {n} needs {need} more server(s) than the job's "
                        f"{len(current)}; only {len(free)} alive server(s) are not in the job")
    return [*current, *free[:need]]


def plan_moves(copies: Sequence[Sequence[str]], target: Sequence[str]) -> list[Move]:
    """The moves that spread shards over `target` evenly while moving as few copies as
    possible. `copies[i]` lists the servers holding shard i, its primary first.

    Primaries first: each target server gets its share of the primaries (len(copies) / n,
    the remainder to the servers that hold the most already), a server over its share keeps
    its lowest shards, and primaries on servers leaving or over their share move to the
    server furthest under its share that holds no copy of that shard. Then backups the same
    way, against each server's share of all copies. A copy on a server leaving always moves
    (some target server holds no copy of its shard, since copies <= len(target)).

    Raises:
        PlanError: a shard has more copies than there are target servers.
    """
    if not target:
        raise PlanError("servers: must be >= 1, got 0")
    for index, held in enumerate(copies):
        if len(held) > len(target):
            raise PlanError(f"servers: {len(target)} < the {len(held)} copies of shard {index}")
    placed = [list(held) for held in copies]
    moves = _spread(placed, target, primaries=True)
    return moves + _spread(placed, target, primaries=False)


def _spread(placed: list[list[str]], target: Sequence[str], primaries: bool) -> list[Move]:
    """One pass of plan_moves over the primaries or over the backups; updates `placed`."""
    def counted() -> dict[str, int]:
        count = dict.fromkeys(target, 0)
        for held in placed:
            for server in held[:1] if primaries else held:
                if server in count:
                    count[server] += 1
        return count

    count = counted()
    total = len(placed) if primaries else sum(len(held) for held in placed)
    share = _shares(count, target, total)
    first, last = (0, 1) if primaries else (1, None)
    leaving = []  # (index, k): copies that leave their server, its highest shards first
    for index in reversed(range(len(placed))):
        for k in range(first, len(placed[index]) if last is None else last):
            source = placed[index][k]
            if source in share and count[source] <= share[source]:
                continue  # stays: a server's lowest shards fill its share
            leaving.append((index, k))
            if source in count:
                count[source] -= 1
    moves = []
    for index, k in reversed(leaving):  # destinations in shard order
        held = placed[index]
        source = held[k]
        choices = [s for s in target if s not in held]
        under = [s for s in choices if count[s] < share[s]]
        if source in share and not under:
            count[source] += 1  # over its share, but nowhere to go without two copies on one
            continue
        dest = min(under or choices, key=lambda s: (count[s] - share[s], target.index(s)))
        held[k] = dest
        count[dest] += 1
        moves.append(Move(index, source, dest, primary=k == 0))
    return moves


def _shares(count: dict[str, int], target: Sequence[str], total: int) -> dict[str, int]:
    """Each target server's even share of `total` copies; the remainder goes to the servers
    holding the most now (fewest moves), ties to the earlier in `target`."""
    base, extra = divmod(total, len(target))
    ranked = sorted(target, key=lambda s: (-count[s], target.index(s)))
    return {s: base + (1 if ranked.index(s) < extra else 0) for s in target}
