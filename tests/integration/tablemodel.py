"""A model with two fixed embedding tables and dense layers, on the digits dataset (pixel
values 0..16 become ids), for the tables' end-to-end tests. `sparse=True` makes the
single-process reference (torch's sparse gradients, for SparseAdam)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardps.proto.tables import RowInit
from shardps.worker import tasks
from shardps.worker.batches import BatchOrder
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


def train_in_one_process(model: nn.Module, data: Any, table_step: Any, *, steps: int,
                         batch: int, lr: float, seed: int,
                         after_backward: Any = None) -> list[torch.Tensor]:
    """The single-process reference of a sync job of table_model: `table_step(params)` (e.g.
    torch.optim.SparseAdam) on the tables' parameters (modules `emb` and `bag`), fused Adam
    (as the servers run it) on the rest, batches in BatchOrder without shuffling;
    `after_backward(tables, dense)` runs between each backward and the optimizer steps (e.g.
    clipping). Returns the dense parameters, in order."""
    tables = [p for n, p in model.named_parameters() if n.split(".")[0] in ("emb", "bag")]
    dense = [p for n, p in model.named_parameters() if n.split(".")[0] not in ("emb", "bag")]
    opts = [table_step(tables), torch.optim.Adam(dense, lr=lr, fused=True)]
    order = BatchOrder(data.num_train, batch, False, seed)
    for t in range(steps):
        for opt in opts:
            opt.zero_grad()
        index = order.batch(t)
        tasks.loss(data.task, model(data.train_x[index]), data.train_y[index]).backward()
        if after_backward is not None:
            after_backward(tables, dense)
        for opt in opts:
            opt.step()
    return dense
