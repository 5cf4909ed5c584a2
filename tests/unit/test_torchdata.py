"""A user's torch datasets as job data: factories' return shapes, collation, and the sharding
rules of map-style (same order as in-memory data) and iterable datasets (one stream, re-created
on a rewind and at the end of an epoch)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from shardps.proto import spec as spec_lib
from shardps.worker import batchsource
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from shardps.worker.torchdata import TorchData
from shardps.worker.torchsource import MapSource, StreamSource


class Squares(Dataset):
    """Sample i: (x = [i, i*i] as floats, y = i % 3); counts what was read."""

    classes = ("a", "b", "c")

    def __init__(self, n: int):
        self.n, self.read = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.read.append(i)
        return torch.tensor([i, i * i], dtype=torch.float64), i % 3


class Counting(IterableDataset):
    """A stream of n samples (x = [epoch, i], y = float(i)); counts how often it was opened."""

    def __init__(self, n: int):
        self.n, self.epoch, self.opened, self.epochs = n, 0, 0, []

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.opened += 1
        self.epochs.append(self.epoch)
        return iter([(torch.tensor([float(self.epoch), float(i)]), float(i)) for i in range(self.n)])


class NoLength(IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(2), 0)])


def squares(n=10):
    return Squares(n), Squares(4)


def counting(n=10):
    return TorchData(Counting(n), Counting(3), task="regression")


def not_data():
    return [Squares(3), Squares(3)]


def data_spec(dataset, **kwargs):
    raw = {"model": {"name": "mlp"}, "stop": {"max_steps": 1},
           "data": {"dataset": dataset, "kwargs": kwargs, "batch_size": 4, "shuffle": True}}
    return spec_lib.validate(raw)["data"]


def test_a_factory_returning_train_and_test_gives_torch_data_with_derived_info():
    data = load_dataset(f"{__name__}:squares", {"n": 10})
    assert isinstance(data, TorchData) and data.task == "classification" and data.num_train == 10
    assert data.info == {"input_shape": (2,), "num_features": 2, "num_classes": 3}
    batches = list(data.test_batches(3))
    assert [len(t) for _, t in batches] == [3, 1]
    (x,), y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.tolist() == [[0, 0], [1, 1], [2, 4]] and y.tolist() == [0, 1, 2]


def test_a_factory_returning_anything_else_is_refused_by_name():
    with pytest.raises(ValueError, match="TorchData or a tuple"):
        load_dataset(f"{__name__}:not_data")
    with pytest.raises(ValueError, match="defines no __len__"):
        TorchData(NoLength(), NoLength())
    with pytest.raises(ValueError, match="test split is a list"):
        TorchData(Squares(3), [1, 2])
    with pytest.raises(ValueError, match="unknown task"):
        TorchData(Squares(3), Squares(3), task="ranking")
    with pytest.raises(ValueError, match="a sample must be a tuple"):
        TorchData(TensorDataset(torch.zeros(3, 2)), Squares(3))


def test_map_style_ranks_read_only_their_slices_of_the_in_memory_order():
    data = TorchData(Squares(10), Squares(4))
    order = BatchOrder(10, 4, True, 7)
    for world in (1, 2, 3, 5):
        sources = [MapSource(data, 4, True, 7) for _ in range(world)]
        for step in range(8):  # two epochs and more: the order wraps like in-memory data
            data.train.read.clear()
            parts = [p for p in (s.take(step, r, world) for r, s in enumerate(sources)) if len(p)]
            assert sorted(data.train.read) == sorted(order.batch(step).tolist())
            assert torch.cat([p.inputs[0][:, 0] for p in parts]).long().tolist() == order.batch(step).tolist()
            assert torch.cat([p.target for p in parts]).tolist() == [i % 3 for i in order.batch(step).tolist()]
    # More ranks than samples: the last ranks get empty batches, which the step loop skips.
    assert len(MapSource(data, 4, True, 7).take(0, 4, 5)) == 0


def test_iterable_ranks_take_contiguous_slices_of_one_stream_across_epochs():
    stream = list(range(10)) * 4  # sample indices of the stream, epoch after epoch
    for world in (1, 2, 3):
        data = counting(10)
        sources = [StreamSource(data, 4) for _ in range(world)]
        for step in range(9):  # 36 samples: three epochs and a bit
            parts = [s.take(step, r, world) for r, s in enumerate(sources)]
            got = torch.cat([p.inputs[0] for p in parts])
            assert got[:, 1].long().tolist() == stream[4 * step : 4 * step + 4]
            assert got[:, 0].long().tolist() == [p // 10 for p in range(4 * step, 4 * step + 4)]
            assert torch.cat([p.target for p in parts]).dtype == torch.float32
        # Each rank opened the stream once an epoch, set_epoch before each (and the info its first).
        assert sorted(data.train.epochs) == [0] + [e for e in range(4) for _ in range(world)]


def test_iterable_rewind_recreates_the_stream_and_skips_to_the_step():
    data = counting(10)
    source = StreamSource(data, 4)
    first = [source.take(step, 1, 2).inputs[0].tolist() for step in range(6)]
    assert source.recreated == 2  # the ends of epochs 0 and 1
    # Back to step 3 (a rollback): a new stream from epoch 0, skipped to position 12.
    assert source.take(3, 1, 2).inputs[0].tolist() == first[3]
    assert source.recreated == 4 and source.position == 16
    # A membership change at step 4: rank 0 of 1 now takes the whole batch from the same stream.
    assert source.take(4, 0, 1).inputs[0][:, 1].tolist() == [6.0, 7.0, 8.0, 9.0]
    assert source.recreated == 4  # it starts at position 16, where the stream stands


def test_an_empty_epoch_is_an_error_not_a_spin():
    class Once(Counting):
        def __iter__(self):
            self.opened += 1
            return iter([(torch.zeros(2), 0.0)] if self.opened == 1 else [])

    source = StreamSource(TorchData(Once(1), Once(1), task="regression"), 2)
    with pytest.raises(ValueError, match="yielded no samples"):
        source.take(0, 0, 1)


def test_open_source_picks_the_torch_sources():
    map_source = batchsource.open_source(load_dataset(f"{__name__}:squares"), data_spec(f"{__name__}:squares"), 0)
    assert isinstance(map_source, MapSource) and map_source.order.shuffle
    stream = batchsource.open_source(load_dataset(f"{__name__}:counting"), data_spec(f"{__name__}:counting"), 0)
    assert isinstance(stream, StreamSource) and stream.batch_size == 4


class Dealt(Counting):
    """Shards itself: rank r of K streams samples r, r + K, ... of each epoch."""

    def __init__(self, n: int):
        super().__init__(n)
        self.places = []

    def shard_stream(self, rank: int, world_size: int):
        self.places.append((rank, world_size, self.epoch))
        return (s for i, s in enumerate(Counting.__iter__(self)) if i % world_size == rank)


def test_an_iterable_that_shards_itself_gives_each_rank_only_its_own_stream():
    data = TorchData(Dealt(10), Counting(3), task="regression")
    sources = [StreamSource(data, 4) for _ in range(2)]
    # Rank r's slice of step t: samples [2t, 2t + 2) of its own stream of 5 an epoch.
    own = {r: [i for e in range(3) for i in range(r, 10, 2)] for r in (0, 1)}
    for step in range(7):
        for rank, source in enumerate(sources):
            got = source.take(step, rank, 2).inputs[0][:, 1].long().tolist()
            assert got == own[rank][2 * step : 2 * step + 2]
    assert sorted(data.train.places) == [(r, 2, e) for r in (0, 1) for e in range(3)]
    # A new place re-creates the stream for it and skips to the step: rank 0 of 1 at step 2
    # takes samples 8..11 of the whole stream.
    assert sources[0].take(2, 0, 1).inputs[0][:, 1].long().tolist() == [8, 9, 0, 1]
    assert sources[0].place == (0, 1)


def test_a_dataset_with_getitems_is_asked_once_for_a_rank_slice():
    class Batched(Squares):
        def __getitems__(self, indices):
            self.read.append(list(indices))
            return [(torch.tensor([i, i * i], dtype=torch.float64), i % 3) for i in indices]

    data = TorchData(Batched(10), Squares(2))
    data.train.read.clear()
    batch = MapSource(data, 4, True, 7).take(1, 1, 2)
    assert data.train.read == [BatchOrder(10, 4, True, 7).slice(1, 1, 2).tolist()]
    assert batch.inputs[0][:, 0].long().tolist() == data.train.read[0]
