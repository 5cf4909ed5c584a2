"""A DLRM-style click model (Naumov et al., 2019): a bottom MLP over the dense features, one
embedding table per categorical feature, pairwise dot products of all the vectors, a top MLP.

Where the tables live is the `tables` kwarg:
  - "dense" (the default): one torch `nn.EmbeddingBag` of `buckets` rows per feature, held and
    trained like any other parameter (pulled and pushed whole every step), so kept small: each
    categorical id is hashed into `buckets` rows (`id mod buckets`; the click log's ids are
    already spread over int64).
  - "server": the same `buckets` rows per feature, in one shardps `Embedding` of
    num_categorical * buckets rows (feature f's rows are f * buckets + id mod buckets) that the
    servers hold row-sharded: each step moves only the rows its batch touches, so `buckets`
    can be far larger than the dense model.
  - "dynamic": one dynamic shardps `Embedding` keyed by the raw id itself (no buckets, no
    collisions from hashing into them): a row is created on the servers when its id is first
    admitted (the spec's `tables:` section sets admission, eviction and a per-server row cap).
    Feature f's ids are XORed with a per-feature 64-bit key first, so the same id in two
    features reads two rows (up to a 2**-64 chance per pair of ids).
One table for all the features rather than one per feature: a step then makes one PullRows and
one PushRows per server, not one per feature and server; each feature keeps its own rows, so
the model computes the same function as with per-feature tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shardps.proto.tables import RowInit
from shardps.worker.embedding import Embedding

TABLE_PLACES = ("dense", "server", "dynamic")
INIT_STD = 0.05  # small vectors: dot products start near 0


def _mlp(widths: Sequence[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _feature_keys(num_categorical: int) -> torch.Tensor:
    """Per-feature int64 keys (SplitMix64 of the feature's index) for the dynamic table."""
    keys = []
    for f in range(num_categorical):
        x = (f + 1) * 0x9E3779B97F4A7C15 % 2**64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB % 2**64
        x ^= x >> 31
        keys.append(x - 2**64 if x >= 2**63 else x)
    return torch.tensor(keys, dtype=torch.int64)


class DLRM(nn.Module):
    """forward(dense float [n, num_dense], cat int64 [n, num_categorical]) -> logits [n].

    Dense counts enter as log1p(max(count, 0)). The bottom MLP ends in `dim` units, the width
    of every embedding; the interaction is the n_vectors * (n_vectors - 1) / 2 dot products
    between the bottom output and the embeddings, concatenated to the bottom output.
    """

    def __init__(self, num_dense: int, num_categorical: int, buckets: int = 1024, dim: int = 8,
                 bottom: Sequence[int] = (32,), top: Sequence[int] = (64, 32),
                 tables: str = "dense"):
        super().__init__()
        if tables not in TABLE_PLACES:
            raise ValueError(f"dlrm tables must be one of {', '.join(TABLE_PLACES)}, got {tables!r}")
        if buckets < 1 or dim < 1:
            raise ValueError(f"dlrm needs buckets >= 1 and dim >= 1, got {buckets} and {dim}")
        self.buckets, self.place = int(buckets), tables
        self.bottom = _mlp([num_dense, *map(int, bottom), dim], last_relu=True)
        self.tables = nn.ModuleList()
        self.table: Embedding | None = None
        if tables == "dense":
            for _ in range(num_categorical):
                bag = nn.EmbeddingBag(self.buckets, dim, mode="sum")
                nn.init.normal_(bag.weight, std=INIT_STD)
                self.tables.append(bag)
        elif tables == "server":
            self.table = Embedding(num_categorical * self.buckets, dim)
            nn.init.normal_(self.table.weight, std=INIT_STD)
        else:
            self.table = Embedding(None, dim, init=RowInit("normal", 0.0, INIT_STD))
        self.offsets: torch.Tensor
        self.register_buffer("offsets", torch.arange(num_categorical) * self.buckets, persistent=False)
        self.keys: torch.Tensor
        self.register_buffer("keys", _feature_keys(num_categorical), persistent=False)
        vectors = num_categorical + 1
        upper = torch.triu_indices(vectors, vectors, offset=1)
        self.upper: torch.Tensor
        self.register_buffer("upper", upper, persistent=False)
        self.top = _mlp([dim + upper.shape[1], *map(int, top), 1], last_relu=False)

    def embeddings(self, cat: torch.Tensor) -> torch.Tensor:
        """The categorical features' vectors [n, num_categorical, dim]."""
        if self.table is None:
            ids = torch.remainder(cat, self.buckets)
            return torch.stack([bag(ids[:, f : f + 1]) for f, bag in enumerate(self.tables)], dim=1)
        if self.place == "server":
            return self.table(torch.remainder(cat, self.buckets) + self.offsets)
        return self.table(torch.bitwise_xor(cat, self.keys))

    def forward(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(torch.log1p(dense.clamp(min=0)))
        stacked = torch.cat([bottom[:, None], self.embeddings(cat)], dim=1)  # [n, vectors, dim]
        dots = torch.bmm(stacked, stacked.transpose(1, 2))                  # [n, vectors, vectors]
        pairs = dots[:, self.upper[0], self.upper[1]]                       # i < j
        return self.top(torch.cat([bottom, pairs], dim=1)).squeeze(1)


def dlrm(info: dict, buckets: int = 1024, dim: int = 8, bottom: Sequence[int] = (32,),
         top: Sequence[int] = (64, 32), tables: str = "dense") -> nn.Module:
    """DLRM for a click log (info num_dense and num_categorical: a `files` dataset of format ctr)."""
    for key in ("num_dense", "num_categorical"):
        if key not in info:
            raise ValueError(f"model 'dlrm' needs a dataset with info[{key!r}] (a ctr file dataset); "
                             f"this dataset has {sorted(info)}")
    return DLRM(int(info["num_dense"]), int(info["num_categorical"]), buckets, dim, bottom, top,
                tables)
