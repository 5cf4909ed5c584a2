"""A DLRM-style click model (Naumov et al., 2019): a bottom MLP over the dense features, one
embedding table per categorical feature, pairwise dot products of all the vectors, a top MLP.

Tables are dense `nn.EmbeddingBag`s held and trained like any other parameter (every table is
pulled and pushed whole each step), so they are kept small: each categorical id is hashed
into `buckets` rows (`id mod buckets`; the click log's ids are already spread over int64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _mlp(widths: Sequence[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """forward(dense float [n, num_dense], cat int64 [n, num_categorical]) -> logits [n].

    Dense counts enter as log1p(max(count, 0)). The bottom MLP ends in `dim` units, the width
    of every embedding; the interaction is the n_vectors * (n_vectors - 1) / 2 dot products
    between the bottom output and the embeddings, concatenated to the bottom output.
    """

    def __init__(self, num_dense: int, num_categorical: int, buckets: int = 1024, dim: int = 8,
                 bottom: Sequence[int] = (32,), top: Sequence[int] = (64, 32)):
        super().__init__()
        if buckets < 1 or dim < 1:
            raise ValueError(f"dlrm needs buckets >= 1 and dim >= 1, got {buckets} and {dim}")
        self.buckets = int(buckets)
        self.bottom = _mlp([num_dense, *map(int, bottom), dim], last_relu=True)
        tables = [nn.EmbeddingBag(self.buckets, dim, mode="sum") for _ in range(num_categorical)]
        for table in tables:  # small vectors: dot products start near 0
            nn.init.normal_(table.weight, std=0.05)
        self.tables = nn.ModuleList(tables)
        vectors = num_categorical + 1
        upper = torch.triu_indices(vectors, vectors, offset=1)
        self.upper: torch.Tensor
        self.register_buffer("upper", upper, persistent=False)
        self.top = _mlp([dim + upper.shape[1], *map(int, top), 1], last_relu=False)

    def forward(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(torch.log1p(dense.clamp(min=0)))
        ids = torch.remainder(cat, self.buckets)
        vectors = [bottom] + [table(ids[:, f : f + 1]) for f, table in enumerate(self.tables)]
        stacked = torch.stack(vectors, dim=1)                      # [n, vectors, dim]
        dots = torch.bmm(stacked, stacked.transpose(1, 2))         # [n, vectors, vectors]
        pairs = dots[:, self.upper[0], self.upper[1]]              # i < j
        return self.top(torch.cat([bottom, pairs], dim=1)).squeeze(1)


def dlrm(info: dict, buckets: int = 1024, dim: int = 8, bottom: Sequence[int] = (32,),
         top: Sequence[int] = (64, 32)) -> nn.Module:
    """DLRM for a click log (info num_dense and num_categorical: a `files` dataset of format ctr)."""
    for key in ("num_dense", "num_categorical"):
        if key not in info:
            raise ValueError(f"model 'dlrm' needs a dataset with info[{key!r}] (a ctr file dataset); "
                             f"this dataset has {sorted(info)}")
    return DLRM(int(info["num_dense"]), int(info["num_categorical"]), buckets, dim, bottom, top)
