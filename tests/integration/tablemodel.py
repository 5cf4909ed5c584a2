"""A model with two fixed embedding tables and dense layers, on the digits dataset (pixel
values 0..16 become ids), for the tables' end-to-end tests. `sparse=True` makes the
single-process reference (torch's sparse gradients, for SparseAdam)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardps.proto.tables import RowInit
from shardps.worker.embedding import Embedding, EmbeddingBag

LEVELS = 17  # digits pixels take the values 0/16 .. 16/16
PIXELS = 8   # the Embedding looks up pixels 16..23, one id per (pixel, value)
BAGGED = 32  # the EmbeddingBag pools the non-zero pixels among 24..55, one bag per sample


class TableModel(nn.Module):
    def __init__(self, num_features: int, num_classes: int, dim: int = 4, sparse: bool = False,
                 init: RowInit | None = None, padding_idx: int | None = None):
        super().__init__()
        self.dense = nn.Linear(num_features, 16)
        self.emb = Embedding(LEVELS * PIXELS, dim, sparse=sparse, init=init,
                             padding_idx=padding_idx)
        self.bag = EmbeddingBag(LEVELS * BAGGED, dim, mode="mean", sparse=sparse, init=init)
        self.head = nn.Linear(16 + PIXELS * dim + dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = (x * (LEVELS - 1)).round().long()
        ids = levels[:, 16 : 16 + PIXELS] + LEVELS * torch.arange(PIXELS)
        bagged = levels[:, 24 : 24 + BAGGED]
        mask = bagged > 0
        flat = (bagged + LEVELS * torch.arange(BAGGED))[mask]
        counts = mask.sum(1)
        offsets = torch.cumsum(counts, 0) - counts  # bags of different sizes, some empty
        parts = [torch.relu(self.dense(x)), self.emb(ids).flatten(1), self.bag(flat, offsets)]
        return self.head(torch.cat(parts, 1))


def table_model(info: dict[str, Any], dim: int = 4, sparse: bool = False,
                server_init: dict[str, Any] | None = None, padding_idx: int | None = None
                ) -> nn.Module:
    """`server_init` ({"kind", "a", "b"}): tables whose servers start their rows from
    init_rows (built with `init=`, no weight on the worker)."""
    init = RowInit(**server_init) if server_init is not None else None
    return TableModel(info["num_features"], info["num_classes"], dim, sparse, init, padding_idx)
