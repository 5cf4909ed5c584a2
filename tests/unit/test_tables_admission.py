"""server/ps/table_admission.py: the count-min sketch that admits dynamic-table ids."""

import pytest
import torch

from shardps.server.ps.table_admission import CountMinSketch


def test_counts_are_exact_without_collisions_and_never_under():
    sketch = CountMinSketch(width=1 << 16, depth=4)
    ids = torch.tensor([-(2**63), -1, 0, 1, 2**63 - 1])
    for k in range(1, 4):
        assert sketch.add(ids).tolist() == [k] * 5
    assert sketch.estimate(ids).tolist() == [3] * 5
    assert sketch.estimate(torch.tensor([2, 3])).tolist() == [0, 0]
    assert sketch.estimate(torch.zeros(0, dtype=torch.int64)).numel() == 0
    assert sketch.add(torch.zeros(0, dtype=torch.int64)).numel() == 0


def test_a_crowded_sketch_over_counts_but_never_under_counts():
    gen = torch.Generator().manual_seed(0)
    sketch = CountMinSketch(width=256, depth=3)  # far fewer counters than ids
    ids = torch.randint(-(2**62), 2**62, (5000,), generator=gen).unique()
    truth = torch.zeros(ids.numel(), dtype=torch.int64)
    for _ in range(20):
        pick = torch.randperm(ids.numel(), generator=gen)[:300].sort().values
        sketch.add(ids[pick])
        truth[pick] += 1
    estimate = sketch.estimate(ids)
    assert bool((estimate >= truth).all())
    assert bool((estimate > truth).any())


def test_conservative_update_raises_only_the_counters_below_the_new_estimate():
    sketch = CountMinSketch(width=64, depth=2)
    a = torch.tensor([123])
    for _ in range(5):
        sketch.add(a)
    before = sketch.counts.clone()
    sketch.add(a)
    cells = sketch._cells(a).flatten()
    assert (sketch.counts.view(-1)[cells] == 6).all()
    changed = (sketch.counts != before).sum()
    assert changed <= 2


def test_halving_ages_counts():
    sketch = CountMinSketch(width=1024, depth=2, halve_every=10)
    ids = torch.tensor([7])
    for _ in range(9):
        sketch.add(ids)
    sketch.tick(5)
    assert sketch.estimate(ids).item() == 9
    sketch.tick(10)
    assert sketch.estimate(ids).item() == 4 and sketch.halved_at == 10
    sketch.tick(19)
    assert sketch.estimate(ids).item() == 4
    sketch.tick(20)
    assert sketch.estimate(ids).item() == 2


def test_state_round_trips():
    sketch = CountMinSketch(width=128, depth=3, halve_every=4)
    sketch.add(torch.arange(50))
    sketch.tick(4)
    counts, meta = sketch.state()
    again = CountMinSketch.from_state(counts, meta)
    assert torch.equal(again.counts, sketch.counts) and again.halved_at == 4
    assert again.estimate(torch.arange(60)).tolist() == sketch.estimate(torch.arange(60)).tolist()
    with pytest.raises(ValueError, match="do not match"):
        CountMinSketch.from_state(counts[:1], meta)


def test_refuses_bad_shapes():
    for kwargs in ({"width": 100}, {"width": 32}, {"depth": 0}, {"depth": 9}, {"halve_every": -1}):
        with pytest.raises(ValueError):
            CountMinSketch(**kwargs)
