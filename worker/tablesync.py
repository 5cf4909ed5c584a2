"""A job's embedding tables on one worker (docs/tables.md): the model's `Embedding` and
`EmbeddingBag` modules attached to the servers, fixed or dynamic, rows fetched by id through
the job's RowClient (ids grouped by the shard that holds them, every shard asked at once) and
row gradients pushed each step.

Admission counting: a training forward's pull counts as a sighting of its ids once per step;
rank 0's evaluation (no gradient), a retry of a failed PullRows, and a step replayed after a
rewind read with PullRowsRequest.no_count; after a rollback the servers' counts are the
checkpoint's, so the replayed steps from it count again.

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
from shardps.proto.tables import FixedLayout, RowInit, dynamic_server_of
from shardps.psclient.rows import RowClient, RowPull, RowPush
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
        the servers with (a dynamic table's rows start on the servers, from init_rows).

        Raises:
            ValueError: a `tables.per_table` entry for a table the model does not have.
        """
        self.modules: list[tuple[str, Embedding | EmbeddingBag]] = table_modules(model)
        unknown = sorted(set(spec["tables"]["per_table"]) - {name for name, _ in self.modules})
        if unknown:
            raise ValueError(f"tables.per_table.{unknown[0]}: the model has no table of that "
                             f"name (its tables: {[name for name, _ in self.modules]})")
        self.initial: dict[str, torch.Tensor] = {}
        self.dims: dict[str, int] = {}
        for name, module in self.modules:
            weight = module.attach(self, name)
            # None: a server-initialised table, whose servers fill its rows. One materialised
            # here (tableinit.materialize) is seeded like any table: its weight is the truth.
            if weight is not None:
                self.initial[name] = weight.cpu()
            self.dims[name] = module.embedding_dim
        self._spec = spec
        self._client: RowClient | None = None
        self._caller: Caller | None = None
        self._layouts: dict[str, FixedLayout] = {}
        self._step = -1  # the step being computed (start_step)
        self._fetches: dict[str, int] = {}  # fetches of each table so far in this step
        self._counted: dict[str, tuple[int, int]] = {}  # the last (step, fetch) that counted
        self._grads: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # take_grads

    def __bool__(self) -> bool:
        return bool(self.modules)

    def specs(self, num_shards: int) -> list[ps_pb2.TableSpec]:
        """The tables' part of the shard config: each table's settings (the spec's `tables`
        section, or its per_table entry), zeros taken from the job's optimizer (lr, eps; lazy
        Adam's betas are always the job's); dynamic tables also get the job's seed, their
        module's init and the admission, eviction and cap settings."""
        return [self._table_spec(name, module, num_shards) for name, module in self.modules]

    def _table_spec(self, name: str, module: Embedding | EmbeddingBag,
                    num_shards: int) -> ps_pb2.TableSpec:
        opt, tab = self._spec["optimizer"], spec_lib.table_settings(self._spec, name)
        out = ps_pb2.TableSpec(
            name=name, dim=module.embedding_dim, num_embeddings=module.num_embeddings or 0,
            num_shards=num_shards, optimizer=tab["optimizer"], lr=tab["lr"] or opt["lr"],
            beta1=opt["betas"][0], beta2=opt["betas"][1], eps=tab["eps"] or opt["eps"],
            weight_decay=tab["weight_decay"],
            initial_accumulator_value=tab["initial_accumulator_value"],
            server_init=None if name in self.initial or module.dynamic else server_init_of(module))
        if module.dynamic:
            init = module.init or RowInit()
            out.MergeFrom(ps_pb2.TableSpec(
                seed=self._spec["seed"], init=init.kind, init_a=init.a, init_b=init.b,
                admit_after=tab["admit_after"], evict_after_steps=tab["evict_after_steps"],
                max_rows=tab["max_rows"], max_bytes=tab["max_bytes"],
                sketch_width=tab["sketch_width"], sketch_depth=tab["sketch_depth"],
                sketch_halve_every=tab["sketch_halve_every"]))
        return out

    def bind(self, client: RowClient, caller: Caller) -> None:
        """Fetches and pushes go through `client`, each call through `caller`."""
        self._client, self._caller = client, caller
        self._layouts = {name: FixedLayout(name, m.num_embeddings, client.num_shards)
                         for name, m in self.modules if not m.dynamic}

    def _shards_of(self, table: str, ids: torch.Tensor, num_shards: int) -> torch.Tensor:
        """The shard holding each id: FixedLayout for a fixed table, dynamic_server_of for a
        dynamic one (the servers check the same)."""
        layout = self._layouts.get(table)
        if layout is not None:
            return layout.place(ids)[0]
        return dynamic_server_of(table, ids, num_shards)

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        assert self._caller is not None, "TableSync.bind first"
        return self._caller.call(what, fn)

    def seed(self) -> None:
        """Rank 0: every shard's rows of every table from the model's initial weights."""
        client = self._client
        assert client is not None, "TableSync.bind first"
        for name, layout in self._layouts.items():  # fixed tables only
            if name not in self.initial:
                continue  # server-initialised
            for shard in range(client.num_shards):
                rows = self.initial[name].index_select(0, layout.ids_on(shard))
                self._call("InitRows", functools.partial(client.init_rows, name, shard, rows))

    def start_step(self, step: int) -> None:
        """The training forward that follows computes step `step` (admission counting)."""
        self._step, self._fetches = step, {}
        self._grads = None

    def _counts(self, table: str) -> bool:
        """Whether this fetch of `table` is a sighting: a training fetch (gradients on) that
        no earlier computation of the same step made (a replay after a rewind does not)."""
        if not torch.is_grad_enabled():  # evaluation
            return False
        nth = self._fetches.get(table, 0)
        self._fetches[table] = nth + 1
        key = (self._step, nth)
        if key <= self._counted.get(table, (-1, -1)):
            return False
        self._counted[table] = key
        return True

    def fetch(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """RowSource: the rows of strictly increasing `ids`, one PullRows per shard holding
        some of them, all sent before any reply is read. Only a call's first try may count as a
        sighting (a retry's earlier try may have counted already: a sighting lost with a
        failed try is not made up)."""
        client = self._client
        assert client is not None, "TableSync.bind first"
        dim = self.dims[table]
        count = self._counts(table)
        out = torch.empty((ids.numel(), dim), dtype=torch.float32)
        server = self._shards_of(table, ids, client.num_shards)
        masks = [(shard, server == shard) for shard in range(client.num_shards)]
        masks = [(shard, mask) for shard, mask in masks if bool(mask.any())]
        pulls = [RowPull(table, shard, ids[mask]) for shard, mask in masks]
        tries = [count]  # True until the first try has gone out

        def pull() -> list[tuple[ps_pb2.PullRowsResponse, torch.Tensor | None]]:
            first, tries[0] = tries[0], False
            return client.pull_many(pulls, dim, count=first, timeout_s=PULL_ROWS_TIMEOUT_S)

        got = self._call("pull_rows", pull)
        for (shard, mask), (reply, rows) in zip(masks, got, strict=True):
            if rows is None:
                raise TimeoutError(f"table {table!r}: shard {shard} sent no rows within "
                                   f"{PULL_ROWS_TIMEOUT_S:.0f} s (version {reply.version})")
            out[mask] = rows
        return out

    def rolled_back(self, step: int) -> None:
        """The servers rolled back to checkpoint `step`, their admission counts with them: the
        steps from `step` on, replayed next, count their sightings again."""
        self._counted = {t: key for t, key in self._counted.items() if key < (step, 0)}

    def forget(self) -> None:
        """Drops the batches and row gradients a step left behind when it did not reach its
        pushes (a rewind: a server died, a rollback), so the step run next pushes only its
        own, as FlatParams.zero_grad does for the dense gradient."""
        self._grads = None
        for _, module in self.modules:
            module.take_row_grads()

    def take_grads(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every table's row gradient of this step, coalesced (ids, rows), taken from the
        modules once after backward (tables no forward reached are absent); `push` sends
        these, with any scaling `scale_grads` applied."""
        if self._grads is None:
            self._grads = {}
            for name, module in self.modules:
                grads = module.take_row_grads()
                if grads is not None:
                    self._grads[name] = grads
        return self._grads

    def scale_grads(self, coef: float) -> None:
        """Multiplies the taken row gradients by `coef` (gradient clipping)."""
        for _, rows in self.take_grads().values():
            rows.mul_(coef)

    def push(self, step: int, batch_size: int) -> list[ps_pb2.PushRowsResponse]:
        """Pushes every table's row gradient of this step, split by shard (none for a table
        no forward reached: its round applies an empty step), every table and shard's request
        sent before any reply is read. Before the dense push, which may close the sync round."""
        client = self._client
        assert client is not None, "TableSync.bind first"
        pushes = []
        taken, self._grads = self.take_grads(), None
        for name, (ids, rows) in taken.items():
            server = self._shards_of(name, ids, client.num_shards)
            for shard in range(client.num_shards):
                mask = server == shard
                if bool(mask.any()):
                    pushes.append(RowPush(name, shard, ids[mask], rows[mask]))
        if not pushes:
            return []
        return self._call("push_rows", functools.partial(
            client.push_many, pushes, step=step, batch_size=batch_size))


def server_init_of(module: Embedding | EmbeddingBag) -> ps_pb2.ServerInit | None:
    """The TableSpec's server_init of a table built with `init` (None for one seeded by rank
    0): its RowInit, the seed it was built under, its padding row."""
    if not module.server_init:
        return None
    init = module.init
    assert init is not None
    return ps_pb2.ServerInit(kind=init.kind, a=init.a, b=init.b, seed=module.init_seed,
                             padding_idx=module.padding_idx)


def attach(model: nn.Module, spec: spec_lib.JobSpec) -> TableSync | None:
    """The model's tables attached, or None if it has none."""
    tables = TableSync(model, spec)
    return tables if tables else None
