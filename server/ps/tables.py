"""A job shard's embedding tables on one server: its part of each of the job's tables
(ShardConfig.tables), and the sync rounds of their row gradients.

Pure core: no gRPC. A shard's `ShardCore` owns one `ShardTables`; everything here that ends
in `_locked` expects the caller to hold the core's condition (rows.py takes it), because a
sync round's row gradients are applied in the same critical section as the dense step that
closes the round (`ShardCore.close_round`), so a pull that sees version v+1 sees both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardps.proto import names as names_lib
from shardps.proto import ps_pb2
from shardps.proto.tables import FixedLayout, RowInit

from .errors import InvalidConfigError, ShardError
from .table_admission import DEFAULT_DEPTH, DEFAULT_WIDTH, CountMinSketch
from .table_config import TableConfig, TableState
from .table_optim import LazyAdam, RowGrads, RowOptimizer, RowwiseAdagrad, combine
from .table_shard import INDEX_BYTES_PER_ROW, META_BYTES_PER_ROW, TableShard

# TableSpec.optimizer names.
OPTIMIZERS = ("lazy_adam", "adagrad")


class UnknownTableError(ShardError):
    """A call names a table the job does not have."""

    reason = "unknown_table"


class RowsAfterStartError(ShardError):
    """InitRows once the shard has taken a step: the rows are training (and checkpointed)."""

    reason = "rows_after_start"


@dataclass(frozen=True)
class Member:
    """A worker of a closing sync round and the samples behind its dense push."""

    worker: str
    batch_size: int


# A hostile or mistaken TableSpec must not make a server allocate without bound: the
# admission sketch is depth * width int32 counters (at most 8 * 2**24 * 4 bytes = 512 MiB).
MAX_SKETCH_WIDTH = 1 << 24


def table_config(spec: ps_pb2.TableSpec, shard_index: int) -> TableConfig:
    """One shard's config of a table (num_embeddings 0: dynamic); InvalidConfigError naming
    the table if it is unusable."""
    try:
        if spec.num_embeddings < 0:
            raise ValueError(f"table {spec.name!r}: num_embeddings must be >= 1 (fixed) or 0 "
                             f"(dynamic), got {spec.num_embeddings}")
        if spec.num_shards < 1:
            raise ValueError(f"table {spec.name!r}: num_shards must be >= 1, got {spec.num_shards}")
        if spec.num_embeddings:
            config = TableConfig(name=spec.name, dim=spec.dim, num_embeddings=spec.num_embeddings,
                                 num_servers=spec.num_shards, server_index=shard_index)
            return server_init(config, spec) if spec.HasField("server_init") else config
        width, depth = spec.sketch_width or DEFAULT_WIDTH, spec.sketch_depth or DEFAULT_DEPTH
        if width > MAX_SKETCH_WIDTH:
            raise ValueError(f"sketch_width must be <= {MAX_SKETCH_WIDTH}, got {width}")
        if spec.admit_after > 1:  # checks the sketch's arguments without allocating it
            CountMinSketch(64, depth, spec.sketch_halve_every)
            if width < 64 or width & (width - 1):
                raise ValueError(f"sketch width must be a power of two >= 64, got {width}")
        init = RowInit(spec.init, spec.init_a, spec.init_b) if spec.init else RowInit()
        return TableConfig(
            name=spec.name, dim=spec.dim, num_embeddings=None, num_servers=spec.num_shards,
            server_index=shard_index, seed=spec.seed, init=init,
            admit_after=max(1, spec.admit_after), evict_after_steps=spec.evict_after_steps,
            max_rows=spec.max_rows, max_bytes=spec.max_bytes,
            sketch_width=width, sketch_depth=depth,
            sketch_halve_every=spec.sketch_halve_every)
    except ValueError as exc:
        message = str(exc)
        if not message.startswith("table "):
            message = f"table {spec.name!r}: {message}"
        raise InvalidConfigError(message) from None


def server_init(config: TableConfig, spec: ps_pb2.TableSpec) -> TableConfig:
    """`config` as a server-initialised fixed table: its rows start from init_rows of the
    spec's seed (proto.tables.init_fixed_rows); ValueError naming the table if unusable."""
    given = spec.server_init
    try:
        init = RowInit(given.kind, given.a, given.b)
    except ValueError as exc:
        raise ValueError(f"table {spec.name!r}: server_init: {exc}") from None
    padding = given.padding_idx if given.HasField("padding_idx") else None
    return dataclasses.replace(config, server_init=True, seed=given.seed, init=init,
                               padding_idx=padding)


def make_optimizer(spec: ps_pb2.TableSpec) -> RowOptimizer:
    """The row optimizer a TableSpec names; InvalidConfigError naming the table if bad."""
    try:
        if spec.optimizer == "lazy_adam":
            return LazyAdam(lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps)
        if spec.optimizer == "adagrad":
            return RowwiseAdagrad(lr=spec.lr, eps=spec.eps, weight_decay=spec.weight_decay,
                                  initial_accumulator_value=spec.initial_accumulator_value)
    except ValueError as exc:
        raise InvalidConfigError(f"table {spec.name!r}: {exc}") from None
    raise InvalidConfigError(f"table {spec.name!r}: optimizer must be one of {OPTIMIZERS}, "
                             f"got {spec.optimizer!r}")


def validate_tables(config: ps_pb2.ShardConfig) -> None:
    """Raises InvalidConfigError unless every table of the config can be built."""
    for spec in config.tables:
        if not names_lib.is_valid(spec.name):
            raise InvalidConfigError(f"bad table name {names_lib.shown(spec.name)}: "
                                     f"{names_lib.RULE.format(n=names_lib.MAX_LEN)}")
    names = [t.name for t in config.tables]
    if len(set(names)) != len(names):
        raise InvalidConfigError("table names are not unique")
    for spec in config.tables:
        table = table_config(spec, config.shard_index)
        optimizer = make_optimizer(spec)
        # TableShard.row_bytes of a dynamic row, which a byte cap must hold at least once.
        row_bytes = (4 * table.dim + optimizer.state_bytes_per_row(table.dim)
                     + META_BYTES_PER_ROW + INDEX_BYTES_PER_ROW)
        if table.max_bytes and table.max_bytes < row_bytes:
            raise InvalidConfigError(f"table {spec.name!r}: max_bytes {table.max_bytes} holds "
                                     f"no row of {row_bytes} bytes")


class ShardTables:
    """The tables of one job shard, and (sync) the row gradients of the open round.

    Thread-safety: each TableShard locks itself for lookups and applies; `pending` is guarded
    by the owning core's condition (methods ending in `_locked`).
    """

    def __init__(self, config: ps_pb2.ShardConfig):
        self.tables: dict[str, TableShard] = {
            spec.name: TableShard(table_config(spec, config.shard_index), make_optimizer(spec))
            for spec in config.tables}
        # sync: step -> worker -> table -> (ids, rows) pushed for that step's round.
        self.pending: dict[int, dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
        # async, ssp: (worker, table) -> the last step applied, so a retried push (its reply
        # lost) is not applied twice.
        self.applied: dict[tuple[str, str], int] = {}
        self.seeded: set[str] = set()  # fixed tables whose rows InitRows has set

    def __bool__(self) -> bool:
        return bool(self.tables)

    def all_seeded(self) -> bool:
        """Whether InitRows has set the rows of every fixed table rank 0 seeds (not the
        server-initialised ones: their servers fill them at InitShard)."""
        return all(name in self.seeded for name, t in self.tables.items()
                   if t.layout is not None and not t.config.server_init)

    def get(self, name: str) -> TableShard:
        table = self.tables.get(name)
        if table is None:
            raise UnknownTableError(f"unknown table {name!r} (the job has "
                                    f"{sorted(self.tables) or 'no tables'})")
        return table

    def layout(self, name: str) -> FixedLayout:
        layout = self.get(name).layout
        assert layout is not None, f"table {name!r} is dynamic: it has no FixedLayout"
        return layout

    def buffer_locked(self, step: int, worker: str, name: str, ids: torch.Tensor,
                      rows: torch.Tensor) -> None:
        """sync: keeps a checked row gradient for step's round (a retry replaces it)."""
        self.pending.setdefault(step, {}).setdefault(worker, {})[name] = (ids, rows)

    def close_round_locked(self, step: int, members: Sequence[Member]) -> None:
        """sync: applies step's round to every table, one optimizer step each (even with no
        rows here: torch counts a step for the whole table), the workers' rows combined and
        weighted by their dense pushes' batch sizes (table_optim.combine). Drops what was
        pushed for this step or earlier."""
        pushed = self.pending.get(step, {})
        for name, table in self.tables.items():
            parts = []
            for member in members:
                ids, rows = pushed.get(member.worker, {}).get(name, (None, None))
                if ids is None or rows is None:
                    ids, rows = torch.empty(0, dtype=torch.int64), torch.empty((0, table.dim))
                parts.append(RowGrads(ids, rows, member.batch_size))
            ids, rows = combine(parts) if parts else (torch.empty(0, dtype=torch.int64),
                                                      torch.empty((0, table.dim)))
            table.apply(ids, rows)
        for old in [s for s in self.pending if s <= step]:
            del self.pending[old]

    def drop_pending_locked(self) -> None:
        """Forgets every buffered row gradient (the shard's round was dropped)."""
        self.pending.clear()

    # -- checkpoints (capture.py) -----------------------------------------------------------

    def capture_locked(self) -> tuple[dict[str, TableState], dict[tuple[str, str], int]]:
        """Copies of every table and of the applied-push table. The open sync round's row
        gradients (`pending`) are not part of it: like its dense pushes, they are pushed again."""
        return ({name: table.capture() for name, table in self.tables.items()},
                dict(self.applied))

    def check_states(self, states: dict[str, TableState]) -> None:
        """InvalidConfigError unless `states` are captures of exactly these tables (names,
        dims, rows, optimizer state) that `load_locked` can take."""
        if sorted(states) != sorted(self.tables):
            raise InvalidConfigError(f"the checkpoint holds tables {sorted(states)}, the shard "
                                     f"{sorted(self.tables)}")
        for name, table in self.tables.items():
            try:
                table.check(states[name])
            except ValueError as exc:
                raise InvalidConfigError(f"the checkpoint's table {name!r} does not fit the "
                                         f"shard's: {exc}") from None

    def load_locked(self, states: dict[str, TableState],
                    applied: dict[tuple[str, str], int]) -> None:
        """Takes checked captures (check_states) in place, and the applied-push table; forgets
        the buffered row gradients (the round they belonged to was dropped)."""
        for name, table in self.tables.items():
            table.restore(states[name])
        self.applied = dict(applied)
        self.pending.clear()
