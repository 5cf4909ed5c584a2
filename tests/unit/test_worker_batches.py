"""The deterministic data order: global batches, rank slices, wrapping and shuffling."""

import itertools

import pytest
import torch

from shardps.worker.batches import BatchOrder, slice_bounds, steps_for_epochs


@pytest.mark.parametrize("batch_size", [1, 5, 64, 65])
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_slices_cover_the_global_batch_exactly(batch_size, world_size):
    bounds = [slice_bounds(batch_size, r, world_size) for r in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == batch_size
    for (_, end), (start, _) in itertools.pairwise(bounds):
        assert end == start  # contiguous, in rank order
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # earlier ranks larger


def test_slice_bounds_rejects_bad_ranks():
    with pytest.raises(ValueError):
        slice_bounds(8, 2, 2)


def test_unshuffled_batches_are_consecutive_and_wrap():
    order = BatchOrder(n=10, batch_size=4, shuffle=False, seed=0)
    assert order.batch(0).tolist() == [0, 1, 2, 3]
    assert order.batch(2).tolist() == [8, 9, 0, 1]  # wraps into the next epoch
    assert order.batch(5).tolist() == [0, 1, 2, 3]  # 20 samples later
    assert order.slice(2, 1, 2).tolist() == [0, 1]


def test_shuffled_epochs_use_the_documented_permutation():
    order = BatchOrder(n=10, batch_size=4, shuffle=True, seed=7)
    stream = torch.cat([order.batch(t) for t in range(5)])  # 20 positions = 2 epochs
    for epoch in range(2):
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch))
        assert torch.equal(stream[epoch * 10 : (epoch + 1) * 10], expected)
    assert not torch.equal(stream[:10], stream[10:])
    twin = BatchOrder(n=10, batch_size=4, shuffle=True, seed=7)
    assert torch.equal(torch.cat([twin.batch(t) for t in range(5)]), stream)
    other = BatchOrder(n=10, batch_size=4, shuffle=True, seed=8)
    assert not torch.equal(torch.cat([other.batch(t) for t in range(5)]), stream)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_worker_slices_concatenate_to_the_single_process_batch(shuffle, world_size):
    single = BatchOrder(n=23, batch_size=7, shuffle=shuffle, seed=1)
    workers = [BatchOrder(n=23, batch_size=7, shuffle=shuffle, seed=1) for _ in range(world_size)]
    for step in range(12):  # several epochs, batches straddling epoch ends
        parts = [w.slice(step, r, world_size) for r, w in enumerate(workers)]
        assert torch.equal(torch.cat(parts), single.batch(step))


def test_more_workers_than_samples_gives_empty_slices():
    order = BatchOrder(n=10, batch_size=2, shuffle=False, seed=0)
    assert [len(order.slice(0, r, 3)) for r in range(3)] == [1, 1, 0]


def test_steps_for_epochs():
    assert steps_for_epochs(0, 100, 64) == 0  # unbounded
    assert steps_for_epochs(1, 100, 64) == 2
    assert steps_for_epochs(0.5, 100, 10) == 5
    assert steps_for_epochs(3, 1438, 64) == 68
    assert steps_for_epochs(0.001, 100, 64) == 1
