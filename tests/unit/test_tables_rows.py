"""server/ps/table_rows.py: rows, optimizer state and metadata move together when rows are
appended and evicted, against a dict of id -> row."""

import pytest
import torch

from shardps.server.ps.table_rows import MIN_CAPACITY, RowStore

DIM = 3
SHAPES = {"m": (DIM,), "acc": ()}


def _store(**kw):
    return RowStore(DIM, SHAPES, {"acc": 0.5}, **kw)


def _check(store: RowStore, reference: dict[int, tuple[torch.Tensor, int]]):
    assert store.rows == len(reference) <= store.capacity
    ids = torch.tensor(sorted(reference), dtype=torch.int64)
    slots = store.find(ids)
    assert bool((slots >= 0).all()) and torch.unique(slots).numel() == ids.numel()
    assert bool((slots < store.rows).all())
    for x, slot in zip(ids.tolist(), slots.tolist(), strict=True):
        row, last = reference[x]
        assert torch.equal(store.weights[slot], row)
        assert torch.equal(store.state["m"][slot], row * 2) and store.state["acc"][slot] == row[0]
        assert store.ids[slot] == x and store.last[slot] == last


def test_append_and_evict_keep_every_row_with_its_state():
    gen = torch.Generator().manual_seed(0)
    store, reference = _store(), {}
    next_id = 0
    for step in range(40):
        m = int(torch.randint(0, 300, (), generator=gen))
        ids = torch.arange(next_id, next_id + m) * 7 - 1000
        next_id += m
        rows = torch.randn(m, DIM, generator=gen)
        slots = store.append(ids, rows, step)
        store.state["m"][slots] = rows * 2  # the state travels with its row
        store.state["acc"][slots] = rows[:, 0]
        reference.update({x: (r, step) for x, r in zip(ids.tolist(), rows, strict=True)})
        if store.rows:
            k = int(torch.randint(0, store.rows + 1, (), generator=gen))
            victims = torch.randperm(store.rows, generator=gen)[:k]
            for x in store.ids[victims].tolist():
                del reference[x]
            store.evict(victims)
        _check(store, reference)
    assert store.find(torch.tensor([10**9])).tolist() == [-1]


def test_new_rows_start_with_the_initial_state_and_capacity_follows_rows():
    store = _store(max_rows=5000)
    slots = store.append(torch.arange(3000), torch.ones(3000, DIM), 0)
    assert store.state["acc"][slots].eq(0.5).all() and store.state["m"][slots].eq(0).all()
    assert 3000 <= store.capacity <= 5000
    store.append(torch.arange(3000, 5000), torch.ones(2000, DIM), 0)
    assert store.capacity == 5000  # grows to the cap, not past it
    store.evict(torch.arange(4500))
    assert store.capacity < 5000 and store.capacity >= max(MIN_CAPACITY, store.rows)
    assert store.nbytes() == store.capacity * (4 * DIM * 2 + 4 + 16) + store.index.nbytes()


def test_least_recent_and_idle_rows():
    store = _store()
    store.append(torch.tensor([5, 1, 9]), torch.zeros(3, DIM), 0)
    store.append(torch.tensor([4, 2]), torch.zeros(2, DIM), 1)
    store.touch(store.find(torch.tensor([9])), 2)
    pick = store.least_recent(2, before=3)
    assert store.ids[pick].tolist() == [1, 5]  # step 0 rows, smallest ids first
    assert sorted(store.ids[store.least_recent(10, before=2)].tolist()) == [1, 2, 4, 5]
    assert store.evict_idle(before=1) == 2  # 5 and 1
    assert sorted(store.ids[: store.rows].tolist()) == [2, 4, 9] and store.oldest == 1
    assert store.evict_idle(before=1) == 0


def test_load_refuses_tensors_that_do_not_fit():
    store = _store()
    store.append(torch.tensor([3, 1]), torch.randn(2, DIM), 4)
    saved = store.sorted_tensors()
    assert saved["ids"].tolist() == [1, 3]
    again = _store()
    again.load(saved)
    assert again.sorted_tensors().keys() == saved.keys()
    assert all(torch.equal(again.sorted_tensors()[k], saved[k]) for k in saved)
    with pytest.raises(ValueError, match="weights"):
        _store().load({**saved, "weights": torch.zeros(2, DIM + 1)})
    with pytest.raises(ValueError, match="ids"):
        _store().load({**saved, "ids": saved["ids"][:1]})
    fixed = RowStore(DIM, SHAPES, {}, weights=torch.zeros(4, DIM))
    with pytest.raises(ValueError, match="holds 2 rows, expected 4"):
        fixed.load(saved)
