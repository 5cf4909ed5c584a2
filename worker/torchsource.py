"""Rank r's part of global batch t from a user's torch dataset (`worker/torchdata.py`).

Map-style (`MapSource`): the same sample indices as in-memory data (`BatchOrder`: seed,
shuffle); rank r fetches only its slice, `dataset[i]` for each index (or one
`dataset.__getitems__(indices)` where defined), and collates it.
Iterable (`StreamSource`): the training stream is the dataset's epochs one after another
(epoch e is `iter(dataset)` after `dataset.set_epoch(e)` when it has that method); global batch
t is stream positions [t*B, (t+1)*B), and rank r takes its contiguous slice of them, as for
in-memory data without shuffling. Every rank reads the stream and keeps only its slice, unless
the dataset shards itself: one with a method `shard_stream(rank, world_size)` gives rank r of
K its own stream (epoch after epoch likewise), and rank r's slice of batch t is the next
slice-size samples of it. A step behind the stream (a rewind, a rollback) or a new place
(rank, world) of a sharding dataset re-creates the stream and skips to the step.
`docs/data.md` ("Your own torch datasets").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from shardps.worker.batches import BatchOrder, slice_bounds
from shardps.worker.batchsource import Batch
from shardps.worker.torchdata import TorchData, collate


class MapSource:
    """Slices of global batches of a map-style dataset. Not thread-safe (one training loop)."""

    def __init__(self, data: TorchData, batch_size: int, shuffle: bool, seed: int):
        self.data = data
        self.order = BatchOrder(data.num_train, batch_size, shuffle, seed)

    def take(self, step: int, rank: int, world: int) -> Batch:
        index = self.order.slice(step, rank, world).tolist()
        if not index:  # more ranks than samples in the batch
            return Batch((), _empty_target(self.data))
        train: Any = self.data.train
        # `__getitems__` (torch's DataLoader convention) fetches a slice in one call.
        getitems = getattr(train, "__getitems__", None)
        samples = list(getitems(index)) if callable(getitems) else [train[i] for i in index]
        inputs, target = collate(samples, self.data.task)
        return Batch(inputs, target)

    def close(self) -> None:
        pass


class StreamSource:
    """Slices of global batches of an IterableDataset, read from one stream that moves forward.

    `position` is the stream position (samples since epoch 0 began) of the next sample the
    stream yields; `place` the (rank, world) whose own stream it is, for a dataset that shards
    itself (None otherwise). Not thread-safe (one training loop).
    """

    def __init__(self, data: TorchData, batch_size: int):
        self.data, self.batch_size = data, batch_size
        self.position = 0
        self.epoch = 0
        self.place: tuple[int, int] | None = None
        self.shards_itself = callable(getattr(data.train, "shard_stream", None))
        self.recreated = 0  # streams opened after the first (rewinds and epochs)
        self._stream: Iterator[Any] | None = None

    def take(self, step: int, rank: int, world: int) -> Batch:
        lo, hi = slice_bounds(self.batch_size, rank, world)
        start, end = step * self.batch_size + lo, step * self.batch_size + hi
        place = None
        if self.shards_itself:  # positions in the rank's own stream
            place, start, end = (rank, world), step * (hi - lo), (step + 1) * (hi - lo)
        if start == end:
            return Batch((), _empty_target(self.data))
        # The first step, a rewind or a rollback, or a sharding dataset's new place.
        if self._stream is None or start < self.position or place != self.place:
            self.place = place
            self._restart()
        while self.position < start:
            self._next()
        inputs, target = collate([self._next() for _ in range(end - start)], self.data.task)
        return Batch(inputs, target)

    def _restart(self) -> None:
        if self._stream is not None:
            self.recreated += 1
        self.position, self.epoch = 0, -1
        self._open_epoch()

    def _open_epoch(self) -> None:
        self.epoch += 1
        set_epoch = getattr(self.data.train, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        train: Any = self.data.train
        self._stream = iter(train.shard_stream(*self.place) if self.place else train)

    def _next(self) -> Any:
        """The next sample of the stream; at the end of an epoch, the first of the next."""
        assert self._stream is not None
        for _ in range(2):  # the end of an epoch re-creates the stream once
            try:
                item = next(self._stream)
            except StopIteration:
                self._open_epoch()
                self.recreated += 1
                continue
            self.position += 1
            return item
        raise ValueError(f"epoch {self.epoch} of the train stream yielded no samples")

    def close(self) -> None:
        self._stream = None


def _empty_target(data: TorchData) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float32 if data.task in ("regression", "binary") else torch.int64)
