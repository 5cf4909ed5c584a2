"""server/ps/table_index.py: the id -> slot hash index of dynamic tables, against a dict."""

import torch

from shardps.server.ps import table_index
from shardps.server.ps.table_index import IdIndex


def _check(index: IdIndex, reference: dict[int, int], probes: torch.Tensor):
    got = index.lookup(probes).tolist()
    assert got == [reference.get(x, -1) for x in probes.tolist()]
    ids, slots = index.items()
    assert dict(zip(ids.tolist(), slots.tolist(), strict=True)) == reference
    assert index.size == len(reference)


def test_random_inserts_removes_updates_match_a_dict():
    gen = torch.Generator().manual_seed(0)
    index, reference = IdIndex(), {}
    next_slot = 0
    universe = torch.cat([torch.randint(-(2**63), 2**63 - 1, (3000,), generator=gen),
                          torch.arange(-50, 50), torch.tensor([-(2**63), 2**63 - 1])]).unique()
    for _ in range(30):
        batch = universe[torch.randperm(universe.numel(), generator=gen)[:400]]
        new = torch.tensor([x for x in batch.tolist() if x not in reference], dtype=torch.int64)
        slots = torch.arange(next_slot, next_slot + new.numel())
        next_slot += new.numel()
        index.insert(new, slots)
        reference.update(zip(new.tolist(), slots.tolist(), strict=True))
        gone = torch.tensor(list(reference)[: len(reference) // 3], dtype=torch.int64)
        index.remove(gone)
        for x in gone.tolist():
            del reference[x]
        if reference:
            moved = torch.tensor(list(reference)[:50], dtype=torch.int64)
            to = torch.arange(10**6, 10**6 + moved.numel())
            index.update(moved, to)
            reference.update(zip(moved.tolist(), to.tolist(), strict=True))
        _check(index, reference, universe)
        # the load bound holds: every probe sequence ends at an EMPTY bucket
        occupied = int((index.table[:, 1] != table_index.EMPTY).sum())
        assert occupied <= table_index.MAX_LOAD * index.buckets


def test_colliding_ids_probe_past_each_other_and_past_deleted_buckets():
    index = IdIndex()
    # ids with the same home bucket: x * golden has the same top bits
    mask = index.buckets - 1
    ids = torch.arange(0, 1 << 22, dtype=torch.int64)
    homes = index._home(ids)
    same = ids[homes == homes[0]][:8]
    assert same.numel() == 8 and bool((index._home(same) == homes[0]).all()) and mask > 8
    index.insert(same, torch.arange(8))
    assert index.lookup(same).tolist() == list(range(8))
    index.remove(same[:4])  # the first four become DELETED; the others are found past them
    assert index.lookup(same).tolist() == [-1] * 4 + [4, 5, 6, 7]
    index.insert(same[:2], torch.tensor([20, 21]))  # deleted buckets are reused
    assert index.lookup(same).tolist() == [20, 21, -1, -1, 4, 5, 6, 7]


def test_duplicate_probes_and_empty_batches():
    index = IdIndex()
    index.insert(torch.tensor([5, -5]), torch.tensor([0, 1]))
    assert index.lookup(torch.tensor([5, 5, -5, 7, 5])).tolist() == [0, 0, 1, -1, 0]
    assert index.lookup(torch.zeros(0, dtype=torch.int64)).numel() == 0
    index.insert(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    index.remove(torch.tensor([7]))  # absent: ignored
    assert index.size == 2


def test_memory_grows_and_shrinks_with_the_ids_held():
    index = IdIndex()
    ids = torch.arange(100_000) * 7919
    index.insert(ids, torch.arange(100_000))
    grown = index.buckets
    assert table_index.REBUILT_LOAD / 2 < 100_000 / grown <= table_index.MAX_LOAD
    assert index.nbytes() == 16 * grown
    index.remove(ids[:95_000])
    assert index.buckets < grown / 8
    assert index.lookup(ids[95_000:]).tolist() == list(range(95_000, 100_000))
    index.clear()
    assert index.size == 0 and index.lookup(ids[:3]).tolist() == [-1] * 3


def test_lookup_of_100k_ids_among_a_million():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(-(2**63), 2**63 - 1, (1_000_000,), generator=gen).unique()
    index = IdIndex()
    for lo in range(0, ids.numel(), 250_000):  # grows through several rebuilds
        index.insert(ids[lo : lo + 250_000], torch.arange(lo, min(lo + 250_000, ids.numel())))
    probe = ids[torch.randint(0, ids.numel(), (100_000,), generator=gen)]
    assert torch.equal(ids[index.lookup(probe)], probe)
    assert index.size == ids.numel() and index.nbytes() == 16 * index.buckets


def test_ids_that_differ_only_in_their_high_or_low_bits_spread_over_buckets():
    for ids in (torch.arange(128) << 56, torch.arange(20_000) << 43, torch.arange(20_000),
                torch.arange(20_000) * 4096, -torch.arange(20_000)):
        ids = ids.unique()
        index = IdIndex()
        index.insert(ids, torch.arange(ids.numel()))
        bucket, _ = index._find(ids)
        displacement = (bucket - index._home(ids)) & (index.buckets - 1)
        assert displacement.double().mean() < 1.0, displacement.double().mean()
        assert index.lookup(ids).tolist() == list(range(ids.numel()))
