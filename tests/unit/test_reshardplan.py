"""The reshard planner without sockets (server/coordinator/reshardplan.py): which servers a
job goes to, and the fewest moves that spread its shards evenly over them."""

from collections import Counter

import pytest

from shardps.server.coordinator.reshardplan import Move, PlanError, choose_servers, plan_moves

A, B, C, D, E = "server-a", "server-b", "server-c", "server-d", "server-e"


def apply(copies, moves):
    placed = [list(held) for held in copies]
    for m in moves:
        k = placed[m.index].index(m.source)
        assert (k == 0) == m.primary
        placed[m.index][k] = m.target
    return placed


def test_growing_from_two_to_four_servers_moves_half_the_shards_round_robin():
    copies = [[A], [B], [A], [B]]  # 4 shards on 2 servers: shard i on server i mod 2
    moves = plan_moves(copies, [A, B, C, D])
    assert moves == [Move(2, A, C, True), Move(3, B, D, True)]
    assert apply(copies, moves) == [[A], [B], [C], [D]]


def test_shrinking_from_four_to_two_drains_the_last_servers():
    copies = [[A], [B], [C], [D]]
    moves = plan_moves(copies, [A, B])
    assert moves == [Move(2, C, A, True), Move(3, D, B, True)]
    assert apply(copies, moves) == [[A], [B], [A], [B]]


def test_the_same_servers_need_no_move():
    assert plan_moves([[A], [B], [A], [B]], [A, B]) == []


def test_a_new_server_takes_only_its_share():
    """6 shards, 2 -> 3 servers: 2 moves (round robin over 3 would move 4)."""
    copies = [[A], [B], [A], [B], [A], [B]]
    moves = plan_moves(copies, [A, B, C])
    assert len(moves) == 2 and {m.target for m in moves} == {C}
    placed = apply(copies, moves)
    assert Counter(h[0] for h in placed) == {A: 2, B: 2, C: 2}


@pytest.mark.parametrize("shards, before, after", [(8, 3, 5), (8, 5, 3), (7, 2, 7), (7, 7, 1),
                                                   (16, 4, 4), (5, 1, 5)])
def test_any_reshard_ends_balanced_with_moves_only_from_full_or_leaving_servers(shards, before,
                                                                                after):
    servers = [f"server-{i}" for i in range(max(before, after))]
    copies = [[servers[i % before]] for i in range(shards)]
    target = servers[:after]
    moves = plan_moves(copies, target)
    placed = apply(copies, moves)
    load = Counter(h[0] for h in placed)
    assert set(load) <= set(target) and max(load.values()) - min(load.values()) <= 1
    assert len(load) == min(after, shards)
    # No more moves than the copies a server must shed to reach its share.
    share = shards // after
    held = Counter(h[0] for h in copies)
    least = sum(max(0, n - (share + 1)) if s in target else n for s, n in held.items())
    assert least <= len(moves) <= sum(max(0, n - share) if s in target else n
                                       for s, n in held.items())


def test_replicated_copies_stay_on_distinct_servers_and_spread():
    """R = 2, 4 shards on 2 servers (each holds every shard): to 4 servers."""
    copies = [[A, B], [B, A], [A, B], [B, A]]
    moves = plan_moves(copies, [A, B, C, D])
    placed = apply(copies, moves)
    assert all(len(set(h)) == 2 for h in placed)
    assert Counter(h[0] for h in placed) == {A: 1, B: 1, C: 1, D: 1}
    assert Counter(s for h in placed for s in h) == {A: 2, B: 2, C: 2, D: 2}
    back = plan_moves(placed, [A, B])
    assert sorted(map(sorted, apply(placed, back))) == [[A, B]] * 4


def test_a_leaving_server_always_moves_even_where_shares_are_met():
    copies = [[A, C], [B, A], [C, B]]
    placed = apply(copies, plan_moves(copies, [A, B, D]))
    assert all(C not in h and len(set(h)) == 2 for h in placed)


def test_choose_servers_drains_the_last_or_adds_free_ones():
    assert choose_servers([A, B, C, D], 2, [], shards=4, replicas=1) == [A, B]
    assert choose_servers([A, B], 4, [E, C, D], shards=4, replicas=1) == [A, B, E, C]
    assert choose_servers([A, B], 2, [], shards=4, replicas=2) == [A, B]


@pytest.mark.parametrize("n, free, shards, replicas, message", [
    (0, [], 4, 1, "servers: must be >= 1, got 0"),
    (5, [C, D, E], 4, 1, "servers: 5 > the job's 4 shards (cluster.shards)"),
    (1, [], 4, 2, "servers: 1 < cluster.replicas 2"),
    (4, [C], 4, 1, "servers: 4 needs 2 more server(s) than the job's 2; only 1 alive server(s)"),
])
def test_impossible_reshards_are_refused_naming_servers(n, free, shards, replicas, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose_servers([A, B], n, free, shards=shards, replicas=replicas)
