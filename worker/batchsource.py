"""Where the training loop gets rank r's part of global batch t: from tensors in memory or from
this worker's own shard files, streamed. One interface, `take(step, rank, world)`.

In memory (`MemorySource`): rank r's slice of global batch t (`worker/batches.py`).
From files (`FileSource`): the global batch size B is split as in memory (rank r gets
`slice_bounds(B, r, K)` rows, b_r); rank r of K reads the files `assign_files(train, range(K),
e, seed)[r]` of its epoch e as a `FileBatchStream` of batches of b_r rows, epoch after epoch;
step t takes the t-th batch of that sequence. Each rank counts its own epochs: epoch e lasts
max(1, ceil(rows_r(e) / b_r)) steps (a rank with no rows that epoch takes one empty step).
`docs/data.md` ("Training from files") states it with what happens when membership changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from shardps.proto import records
from shardps.worker import filedataset, fileorder
from shardps.worker.batches import BatchOrder, slice_bounds
from shardps.worker.datasets import Dataset, load_dataset
from shardps.worker.filedata import FileBatchStream, ReadStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """One rank's batch: the model's positional inputs and the targets (len: samples)."""

    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.target)

    def inputs_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(x.to(device) for x in self.inputs)


class TrainData(Protocol):
    """What the training loop needs of a dataset, in memory or in files."""

    @property
    def task(self) -> str: ...

    @property
    def info(self) -> dict[str, Any]: ...

    @property
    def num_train(self) -> int: ...

    def test_batches(self, batch_size: int) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]: ...


class BatchSource(Protocol):
    def take(self, step: int, rank: int, world: int) -> Batch: ...

    def close(self) -> None: ...


def load_data(data_spec: Mapping[str, Any], seed: int) -> Dataset | filedataset.FileDataset:
    """The dataset a spec's `data` section names: shard files, or built in memory."""
    if data_spec["dataset"] == "files":
        return filedataset.load(data_spec["files"])
    return load_dataset(data_spec["dataset"], data_spec["kwargs"], seed)


def open_source(data: TrainData, data_spec: Mapping[str, Any], seed: int,
                file_opened: Callable[[], None] | None = None) -> BatchSource:
    """The batch source for `data` under the spec's batch size and shuffle; `file_opened` is
    called (on the reader thread) each time a training file is opened (a metric's inc)."""
    stats = ReadStats(on_open=lambda path: file_opened()) if file_opened else None
    if isinstance(data, filedataset.FileDataset):
        return FileSource(data, data_spec["batch_size"], data_spec["shuffle"], seed, stats)
    if isinstance(data, Dataset):
        return MemorySource(data, data_spec["batch_size"], data_spec["shuffle"], seed)
    raise TypeError(f"no batch source for {type(data).__name__}")


class MemorySource:
    """Slices of global batches of an in-memory dataset. Not thread-safe (one training loop)."""

    def __init__(self, data: Dataset, batch_size: int, shuffle: bool, seed: int):
        self.data = data
        self.order = BatchOrder(data.num_train, batch_size, shuffle, seed)

    def take(self, step: int, rank: int, world: int) -> Batch:
        index = self.order.slice(step, rank, world)
        return Batch((self.data.train_x[index],), self.data.train_y[index])

    def close(self) -> None:
        pass


class FileSource:
    """Rank r's batches from its own files, read ahead; see the module docstring for the order.

    Keeps one open stream; a step that is not the stream's next batch (a rewind, a jump, a
    new rank or world size) closes it and opens the right epoch at the right row, reading
    nothing before it. Before a stream opens, its files' headers are checked against the
    rows the dataset promised (DataFileError naming the file). Not thread-safe; `close()`
    stops the reader.
    """

    def __init__(self, data: filedataset.FileDataset, batch_size: int, shuffle: bool, seed: int,
                 stats: ReadStats | None = None):
        self.data = data
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.stats = stats if stats is not None else ReadStats()
        self._stream: FileBatchStream | None = None
        self._at: tuple[int, int, int, int] | None = None  # (rank, world, epoch, next batch)
        self._cursor: tuple[int, int, int, int] = (-1, 0, 0, 0)  # (rank, world, epoch, its first step)

    def files_of(self, rank: int, world: int, epoch: int) -> list[str]:
        return fileorder.assign_files(self.data.train_files, range(world), epoch, self.seed)[rank]

    def epoch_steps(self, rank: int, world: int, epoch: int) -> int:
        """Steps rank spends in its epoch: its batches, or one (empty) if it has no rows."""
        rows = sum(self.data.rows[f] for f in self.files_of(rank, world, epoch))
        return max(1, math.ceil(rows / slice_size(self.batch_size, rank, world)))

    def locate(self, step: int, rank: int, world: int) -> tuple[int, int]:
        """(epoch, batch within it) of `step` for this rank, as if (rank, world) held from step 0."""
        r, k, epoch, first = self._cursor
        if (r, k) != (rank, world) or step < first:
            epoch, first = 0, 0
        while step >= first + (length := self.epoch_steps(rank, world, epoch)):
            first += length
            epoch += 1
        self._cursor = (rank, world, epoch, first)
        return epoch, step - first

    def take(self, step: int, rank: int, world: int) -> Batch:
        b = slice_size(self.batch_size, rank, world)
        if b == 0:  # more ranks than samples in a global batch
            return _empty(self.data.dtype)
        epoch, index = self.locate(step, rank, world)
        if self._at != (rank, world, epoch, index):
            self._open(rank, world, epoch, index, b)
        assert self._stream is not None
        self._at = (rank, world, epoch, index + 1)
        try:
            got = next(self._stream)
        except StopIteration:  # no rows this epoch, or skip_bad left some files out
            return _empty(self.data.dtype)
        return Batch((got.dense, got.cat), got.label)

    def _open(self, rank: int, world: int, epoch: int, index: int, b: int) -> None:
        self.close()
        files = self._checked(self.files_of(rank, world, epoch))
        if index:
            logger.info("rank %d of %d starts epoch %d at its batch %d", rank, world, epoch, index)
        self._stream = FileBatchStream(files, b, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                                       prefetch=self.data.prefetch, skip_bad=self.data.skip_bad,
                                       stats=self.stats, skip_rows=index * b)

    def _checked(self, files: list[str]) -> list[str]:
        """The files whose headers agree with the rows the dataset was loaded with (a file that
        changed since is bad: the order of every rank depends on those rows)."""
        kept = []
        for path in files:
            try:
                header = records.inspect(path, self.data.dtype)
                if header.rows != self.data.rows[path]:
                    source = "the manifest says" if self.data.from_manifest else "it had when the job loaded"
                    raise records.DataFileError(path, f"holds {header.rows} rows, {source} {self.data.rows[path]}")
            except records.DataFileError as e:
                if not self.data.skip_bad:
                    raise
                self.stats.skip(e)
                continue
            kept.append(path)
        return kept

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream, self._at = None, None


def slice_size(batch_size: int, rank: int, world: int) -> int:
    lo, hi = slice_bounds(batch_size, rank, world)
    return hi - lo


def _empty(dtype: Any) -> Batch:
    return Batch((torch.zeros(0, dtype["dense"].shape[0]), torch.zeros(0, dtype["cat"].shape[0], dtype=torch.int64)),
                 torch.zeros(0))
