"""A user's own `torch.utils.data` datasets (map-style or iterable) as a job's train/test split:
what a dataset factory returns, the shape info model factories get, and how samples collate.

A factory returns `TorchData(train, test, task=..., info=...)` or a tuple `(train, test)`
(task classification). A sample is a tuple `(input, ..., target)`; a batch is
`torch.utils.data.default_collate` of samples, floating inputs as float32 and targets as the
task wants them (as `worker/datasets.py` converts in-memory data). `docs/data.md` ("Your own
torch datasets") states the sharding rules that `worker/torchsource.py` follows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from shardps.worker import tasks


def is_iterable(data: Dataset[Any]) -> bool:
    return isinstance(data, IterableDataset)


@dataclass(frozen=True)
class TorchData:
    """A train and a test split as torch datasets, the task and the info for model factories.

    `train` is map-style (`__getitem__` and `__len__`) or an `IterableDataset`, which must
    define `__len__` (samples an epoch; the step budget of `stop.max_epochs` counts on it).
    Missing `info` keys are derived from `train[0]` (or the stream's first sample):
    `input_shape` and `num_features` of the first input, `num_outputs` for regression and
    binary, `num_classes` for classification from the dataset's `classes` (torchvision's
    convention) when it has one. Threading: immutable; the datasets are read by one thread.
    """

    train: Dataset[Any]
    test: Dataset[Any]
    task: str = "classification"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tasks.check_task(self.task)
        for split, data in (("train", self.train), ("test", self.test)):
            if not isinstance(data, Dataset):
                raise ValueError(f"{split} split is a {type(data).__name__}, "
                                 "expected a torch.utils.data.Dataset or IterableDataset")
        if not hasattr(self.train, "__len__"):
            raise ValueError("the train split defines no __len__ (samples an epoch): an "
                             "IterableDataset needs one, map-style datasets always do")
        if len(self.train) < 1:
            raise ValueError("the train split is empty")
        object.__setattr__(self, "info", {**self._derived_info(), **dict(self.info)})

    @property
    def num_train(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    def test_batches(self, batch_size: int) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """The test split in order (map-style by index, iterable as it streams) in batches."""
        items = iter(self.test) if is_iterable(self.test) else (self.test[i] for i in range(len(self.test)))  # type: ignore[arg-type]
        chunk: list[Any] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == batch_size:
                yield collate(chunk, self.task)
                chunk = []
        if chunk:
            yield collate(chunk, self.task)

    def _derived_info(self) -> dict[str, Any]:
        first = self.train[0] if not is_iterable(self.train) else next(iter(self.train))
        inputs, target = collate([first], self.task)
        shape = tuple(inputs[0].shape[1:])
        info: dict[str, Any] = {"input_shape": shape, "num_features": math.prod(shape)}
        if self.task in ("regression", "binary"):
            info["num_outputs"] = math.prod(target.shape[1:])
        classes = getattr(self.train, "classes", None)
        if self.task == "classification" and isinstance(classes, Sequence):
            info["num_classes"] = len(classes)
        return info


def collate(samples: list[Any], task: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(inputs, target) of a list of samples `(input, ..., target)`, collated by torch."""
    batch = default_collate(samples)
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("a sample must be a tuple (input, ..., target) of two or more, got "
                         f"{type(samples[0]).__name__} of {len(batch)}")
    inputs = tuple(x.float() if x.is_floating_point() else x for x in batch[:-1])
    target_dtype = torch.float32 if task in ("regression", "binary") else torch.int64
    return inputs, torch.as_tensor(batch[-1]).to(target_dtype)


def from_factory(made: object) -> TorchData | None:
    """What a user factory returned as TorchData: itself, or a tuple (train, test) of torch
    datasets; None for anything else (the caller names what it expects)."""
    if isinstance(made, TorchData):
        return made
    if isinstance(made, tuple) and len(made) == 2 and all(isinstance(d, Dataset) for d in made):
        return TorchData(made[0], made[1])
    return None
