"""Where the training loop gets rank r's part of global batch t: from tensors in memory or from
this worker's own shard files, streamed. One interface, `take(step, rank, world)`.

In memory (`MemorySource`): rank r's slice of global batch t (`worker/batches.py`).
From files (`FileSource`): epoch e is the global steps [e * L, (e + 1) * L), L = ceil(train rows /
B) for every rank and world size (`worker/fileplan.py`). A worker reads epoch e with the place
(rank r, world K) it held at its first step in the epoch: the files `assign_files(train,
range(K), e, seed)[r]`, R rows in all, as a `FileBatchStream` of batches of ceil(R / L) rows;
step e * L + j takes batch j, or nothing once the batches run out. `docs/data.md` ("Training
from files", "Assignment when workers join or leave").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from shardps.proto import records
from shardps.worker import filedataset, fileorder, fileplan, torchdata
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import Dataset, load_dataset
from shardps.worker.filedata import FileBatchStream, ReadStats
from shardps.worker.fileplan import Place

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


def load_data(data_spec: Mapping[str, Any], seed: int) -> Dataset | filedataset.FileDataset | torchdata.TorchData:
    """The dataset a spec's `data` section names: shard files, built in memory, or a user's
    torch datasets."""
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
    if isinstance(data, torchdata.TorchData):
        from shardps.worker import torchsource  # it imports Batch from here

        if torchdata.is_iterable(data.train):
            return torchsource.StreamSource(data, data_spec["batch_size"])
        return torchsource.MapSource(data, data_spec["batch_size"], data_spec["shuffle"], seed)
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

    Keeps one open stream; a step that is not the stream's next batch (a rewind, a jump, an
    epoch read with another place) closes it and opens the right epoch at the right row,
    reading nothing before it. Before a stream opens, its files' headers are checked against
    the rows the dataset promised (DataFileError naming the file). Not thread-safe; `close()`
    stops the reader.
    """

    def __init__(self, data: filedataset.FileDataset, batch_size: int, shuffle: bool, seed: int,
                 stats: ReadStats | None = None):
        self.data = data
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.stats = stats if stats is not None else ReadStats()
        self.steps_per_epoch = fileplan.epoch_length(data.num_train, batch_size)
        self.places = fileplan.EpochPlaces()
        self.max_ahead = 0  # most batches any of its streams held read ahead of the loop
        self._stream: FileBatchStream | None = None
        self._at: tuple[Place, int, int] | None = None  # (place, epoch, next batch) of the stream
        self._plans: dict[tuple[Place, int], EpochPlan] = {}

    def plan(self, place: Place, epoch: int) -> EpochPlan:
        """What `place` reads in `epoch`: its files, rows a batch and batches."""
        key = (place, epoch)
        if key not in self._plans:
            if len(self._plans) > 64:  # a few epochs and places are asked for again, not more
                self._plans.clear()
            files = fileorder.assign_files(self.data.train_files, range(place.world), epoch,
                                           self.seed)[place.rank]
            self._plans[key] = EpochPlan.of(files, self.data.rows, self.steps_per_epoch)
        return self._plans[key]

    def take(self, step: int, rank: int, world: int) -> Batch:
        epoch, index = divmod(step, self.steps_per_epoch)
        place = self.places.place(epoch, index, Place(rank, world))
        if place is None:  # joined inside this epoch: the others read its files
            return _empty(self.data.dtype)
        plan = self.plan(place, epoch)
        if index >= plan.batches:  # no rows left this epoch
            return _empty(self.data.dtype)
        if self._at != (place, epoch, index):
            self._open(place, epoch, index, plan)
        assert self._stream is not None
        self._at = (place, epoch, index + 1)
        try:
            got = next(self._stream)
        except StopIteration:  # skip_bad left some files out
            return _empty(self.data.dtype)
        return Batch((got.dense, got.cat), got.label)

    def _open(self, place: Place, epoch: int, index: int, plan: EpochPlan) -> None:
        self.close()
        files = self._checked(plan.files)
        if index:
            logger.info("rank %d of %d starts epoch %d at its batch %d", place.rank, place.world, epoch, index)
        self._stream = FileBatchStream(files, plan.batch_size, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                                       prefetch=self.data.prefetch, skip_bad=self.data.skip_bad,
                                       stats=self.stats, skip_rows=index * plan.batch_size)

    def _checked(self, files: Sequence[str]) -> list[str]:
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
            self.max_ahead = max(self.max_ahead, self._stream.max_ahead)
        self._stream, self._at = None, None


@dataclass(frozen=True)
class EpochPlan:
    """One place's epoch: its files in reading order, rows a batch, batches (the rest of the
    epoch's steps are empty)."""

    files: tuple[str, ...]
    rows: int
    batch_size: int
    batches: int

    @staticmethod
    def of(files: Sequence[str], rows_of: Mapping[str, int], steps: int) -> EpochPlan:
        """Rows a batch = ceil(rows / steps), so that the files last at most the epoch's steps."""
        rows = sum(rows_of[f] for f in files)
        size = math.ceil(rows / steps)
        return EpochPlan(tuple(files), rows, size, math.ceil(rows / size) if rows else 0)


def _empty(dtype: Any) -> Batch:
    return Batch((torch.zeros(0, dtype["dense"].shape[0]), torch.zeros(0, dtype["cat"].shape[0], dtype=torch.int64)),
                 torch.zeros(0))
