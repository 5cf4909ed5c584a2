"""A job's embedding tables on one worker (docs/tables.md): the model's `Embedding` and
`EmbeddingBag` modules attached to the servers, rows fetched by id through the job's
RowClient (ids grouped by the shard that holds them) and row gradients pushed each step.

Owned by the training thread, like the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch
from torch import nn

from shardps.proto import ps_pb2
from shardps.proto import spec as spec_lib
from shardps.proto.tables import FixedLayout
from shardps.psclient.rows import RowClient
from shardps.worker.embedding import Embedding, EmbeddingBag, table_modules

_T = TypeVar("_T")
PULL_ROWS_TIMEOUT_S = 30.0


class Caller(Protocol):
    """How a row call is made: JobShards.call (retries, refusals mapped to outcomes)."""

    def call(self, what: str, fn: Callable[[], _T]) -> _T: ...


class TableSync:
    """The attached tables of one model, as a `RowSource` for their modules."""

    def __init__(self, model: nn.Module, spec: spec_lib.JobSpec):
        """Attaches every table of `model` (before FlatParams is built, so their weights stay
        out of the dense layout) and keeps the fixed tables' initial rows, for rank 0 to seed
        the servers with.

        Raises:
            ValueError: a dynamic table (not served over the wire yet), or gradient clipping
                (it would clip the dense part only).
        """
        self.modules: list[tuple[str, Embedding | EmbeddingBag]] = table_modules(model)
        if self.modules and spec["optimizer"]["clip_grad_norm"] > 0:
            raise ValueError("optimizer.clip_grad_norm is not supported with embedding tables "
                             "yet (it would clip the dense gradient only)")
        self.initial: dict[str, torch.Tensor] = {}
        for name, module in self.modules:
            if module.num_embeddings is None:
                raise ValueError(f"table {name!r}: dynamic tables are not served over the "
                                 "wire yet")
            weight = module.attach(self, name)
            assert weight is not None
            self.initial[name] = weight.cpu()
        self._opt, self._tables = spec["optimizer"], spec["tables"]
        self._client: RowClient | None = None
        self._caller: Caller | None = None
        self._layouts: dict[str, FixedLayout] = {}

    def __bool__(self) -> bool:
        return bool(self.modules)

    def specs(self, num_shards: int) -> list[ps_pb2.TableSpec]:
        """The tables' part of the shard config: the spec's `tables` section, its zeros
        taken from the job's optimizer (lr, eps; lazy Adam's betas are always the job's)."""
        opt, tab = self._opt, self._tables
        return [ps_pb2.TableSpec(
            name=name, dim=m.embedding_dim, num_embeddings=m.num_embeddings,
            num_shards=num_shards, optimizer=tab["optimizer"], lr=tab["lr"] or opt["lr"],
            beta1=opt["betas"][0], beta2=opt["betas"][1], eps=tab["eps"] or opt["eps"],
            weight_decay=tab["weight_decay"],
            initial_accumulator_value=tab["initial_accumulator_value"])
            for name, m in self.modules]

    def bind(self, client: RowClient, caller: Caller) -> None:
        """Fetches and pushes go through `client`, each call through `caller`."""
        self._client, self._caller = client, caller
        self._layouts = {name: FixedLayout(name, m.num_embeddings, client.num_shards)
                         for name, m in self.modules}

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        assert self._caller is not None, "TableSync.bind first"
        return self._caller.call(what, fn)

    def seed(self) -> None:
        """Rank 0: every shard's rows of every table from the model's initial weights."""
        client = self._client
        assert client is not None, "TableSync.bind first"
        for name, layout in self._layouts.items():
            for shard in range(client.num_shards):
                rows = self.initial[name].index_select(0, layout.ids_on(shard))
                self._call("InitRows", functools.partial(client.init_rows, name, shard, rows))

    def fetch(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """RowSource: the rows of strictly increasing `ids`, one PullRows per shard holding
        some of them."""
        client = self._client
        assert client is not None, "TableSync.bind first"
        dim = self.initial[table].shape[1]
        out = torch.empty((ids.numel(), dim), dtype=torch.float32)
        server, _ = self._layouts[table].place(ids)
        for shard in range(client.num_shards):
            mask = server == shard
            if not bool(mask.any()):
                continue
            reply, rows = self._call("pull_rows", functools.partial(
                client.pull_rows, table, shard, ids[mask], dim, timeout_s=PULL_ROWS_TIMEOUT_S))
            if rows is None:
                raise TimeoutError(f"table {table!r}: shard {shard} sent no rows within "
                                   f"{PULL_ROWS_TIMEOUT_S:.0f} s (version {reply.version})")
            out[mask] = rows
        return out

    def forget(self) -> None:
        """Drops the batches and row gradients a step left behind when it did not reach its
        pushes (a rewind: a server died, a rollback), so the step run next pushes only its
        own, as FlatParams.zero_grad does for the dense gradient."""
        for _, module in self.modules:
            module.take_row_grads()

    def push(self, step: int, batch_size: int) -> list[ps_pb2.PushRowsResponse]:
        """Pushes every table's row gradient of this step, split by shard (none for a table
        no forward reached: its round applies an empty step). Before the dense push, which
        may close the sync round."""
        client = self._client
        assert client is not None, "TableSync.bind first"
        replies = []
        for name, module in self.modules:
            grads = module.take_row_grads()
            if grads is None:
                continue
            ids, rows = grads
            server, _ = self._layouts[name].place(ids)
            for shard in range(client.num_shards):
                mask = server == shard
                if not bool(mask.any()):
                    continue
                replies.append(self._call("push_rows", functools.partial(
                    client.push_rows, name, shard, ids[mask], rows[mask], step=step,
                    batch_size=batch_size)))
        return replies


def attach(model: nn.Module, spec: spec_lib.JobSpec) -> TableSync | None:
    """The model's tables attached, or None if it has none."""
    tables = TableSync(model, spec)
    return tables if tables else None
