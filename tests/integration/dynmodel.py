"""A model with one dynamic embedding table (ids from the whole int64 range) and dense
layers, and a dataset it can learn, for the dynamic tables' end-to-end tests.

A sample is HOT_COLUMNS + COLD_COLUMNS small integers (exact in float32): one "hot" index in
[0, hot) that decides the label (a hash of it: a hot id repeats, so its row can learn it),
and cold indices drawn from [0, 2**24), almost all seen once (noise the table must hold,
admit or evict). The model turns column c's index i into the id mix64(i + c * 2**32):
mix64 is a bijection of int64, so distinct (column, index) pairs are distinct ids, spread
over the whole int64 range.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardps.proto.tables import RowInit, mix64, mix64_int
from shardps.worker.datasets import Dataset
from shardps.worker.embedding import EmbeddingBag

COLD_RANGE = 1 << 24


def ids_of(x: torch.Tensor) -> torch.Tensor:
    """The table ids of a batch of samples [n, columns] (int64 [n, columns])."""
    columns = torch.arange(x.shape[1], dtype=torch.int64) << 32
    return mix64(x.to(torch.int64) + columns)


def label_of(hot: int) -> float:
    """The target of hot index `hot`: +-1 from a hash of it."""
    return 1.0 if mix64_int(hot) & 1 else -1.0


def dyn_data(num_train: int = 4096, num_test: int = 256, hot: int = 60, cold: int = 3,
             seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([label_of(h) for h in range(hot)])

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, hot, (n, 1), generator=gen)
        noise = torch.randint(0, COLD_RANGE, (n, cold), generator=gen)
        return torch.cat([pick, noise], 1).float(), labels[pick[:, 0]]

    train_x, train_y = split(num_train)
    test_x, test_y = split(num_test)
    return Dataset(train_x, train_y, test_x, test_y, task="regression",
                   info={"num_features": 1 + cold, "num_outputs": 1})


class DynModel(nn.Module):
    def __init__(self, dim: int = 4):
        super().__init__()
        # Built first: a dynamic table draws nothing from torch's RNG, so the dense layers
        # start the same in a reference that builds this model from the same seed.
        self.bag = EmbeddingBag(None, dim, mode="sum", init=RowInit("normal", 0.0, 0.1))
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(ids_of(x)))


def dyn_model(info: dict[str, Any], dim: int = 4) -> nn.Module:
    return DynModel(dim)
