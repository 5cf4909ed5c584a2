"""TableShard: the rows of one embedding table that one server holds, and their optimizer.

Pure core: no gRPC, no job. A pull calls `lookup(ids)`, a push (or a sync round's combined
gradient, table_optim.combine) calls `apply(ids, grads)`; checkpoints call `capture` and
`from_state`; export calls `rows_in_slot_order` (fixed) or `export`. docs/tables.md is the
model; table_rows.RowStore holds the rows.

- Fixed table (ids in [0, N)): proto.tables.FixedLayout computes an id's server and slot, so
  the shard is exactly its rows_on(server) rows, with no per-row index or metadata.
- Dynamic table (any int64 id): a row is created on lookup once admitted (the id's sightings
  reach `admit_after`, counted by a CountMinSketch when that is > 1) with
  proto.tables.init_rows of (seed, table, id); before that the id reads as zeros and its
  gradient is dropped. Rows are evicted when not touched (looked up or updated) for
  `evict_after_steps` steps, and least recently touched first (ties: smallest id) when a
  lookup would take the table past its cap: then down to 1/64 under the cap, so the O(rows)
  scan for victims runs once per cap/64 new rows rather than on every lookup. A lookup never
  evicts rows touched at the current step; when those alone fill the cap, the new ids it
  cannot place read as zeros, and their gradients are dropped.

Steps: a table's step is the number of `apply` calls so far (its optimizer's step count);
lookups made before the next apply belong to that step.

Thread-safety: every public method takes the shard's lock. Every error is raised before
anything changes.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import torch

from shardps.proto import tables as tables_lib
from shardps.proto.tables import FixedLayout, TableIdError

from .errors import TableMemoryError
from .table_admission import CountMinSketch
from .table_config import TableConfig, TableState, TableStats
from .table_index import REBUILT_LOAD
from .table_optim import RowOptimizer, make_optimizer
from .table_rows import RowStore

META_BYTES_PER_ROW = 16      # a dynamic row's id and last-touched step (int64 each)
INDEX_BYTES_PER_ROW = math.ceil(16 / REBUILT_LOAD)  # IdIndex at its load after a rebuild
CAP_SLACK = 64               # evicting for the cap goes 1/64 of the cap below it


class TableShard:
    def __init__(self, config: TableConfig, optimizer: RowOptimizer,
                 weights: torch.Tensor | None = None):
        """A fixed table's rows start as `weights` [rows_on(server), dim] (taken over); if
        None, from init_fixed_rows when `config.server_init`, else zeros to be
        filled with `write_rows`. A dynamic table's start empty.

        Raises:
            ValueError: weights for a dynamic table, or of the wrong shape; a byte cap too
                small for one row.
            TableMemoryError: a fixed table's rows cannot be allocated.
        """
        self.config = config
        self.name = config.name
        self.dim = config.dim
        self.optimizer = optimizer
        self._lock = threading.Lock()
        self.layout = (FixedLayout(config.name, config.num_embeddings, config.num_servers)
                       if config.num_embeddings is not None else None)
        self._counters = {"admissions": 0, "evicted_idle": 0, "evicted_cap": 0,
                          "unadmitted_reads": 0, "dropped_rows": 0}
        self.sketch: CountMinSketch | None = None
        self.row_cap = 0
        shapes, initial = optimizer.state_shapes(config.dim), optimizer.initial_state()
        if self.layout is not None:
            self._store = _fixed_store(config, self.layout, weights, shapes, initial,
                                       self.row_bytes())
            return
        if weights is not None:
            raise ValueError(f"table {self.name!r}: a dynamic table starts empty")
        self.row_cap = _row_cap(config, self.row_bytes())
        self._store = RowStore(config.dim, shapes, initial, max_rows=self.row_cap)
        if config.admit_after > 1:
            self.sketch = CountMinSketch(config.sketch_width, config.sketch_depth,
                                         config.sketch_halve_every)

    # -- sizes ------------------------------------------------------------------------------

    def row_bytes(self) -> int:
        """Bytes per row held: weights and optimizer state, and for a dynamic table its id,
        last-touched step and its share of the index (at the load after a rebuild)."""
        per = 4 * self.dim + self.optimizer.state_bytes_per_row(self.dim)
        return per if self.layout is not None else per + META_BYTES_PER_ROW + INDEX_BYTES_PER_ROW

    def nbytes(self) -> int:
        """Resident bytes: the store's tensors at their capacity, and the admission sketch."""
        return self._store.nbytes() + (self.sketch.nbytes() if self.sketch is not None else 0)

    @property
    def rows(self) -> int:
        return self._store.rows

    @property
    def steps(self) -> int:
        return self.optimizer.steps

    def stats(self) -> TableStats:
        with self._lock:
            return TableStats(rows=self._store.rows, capacity=self._store.capacity,
                              bytes=self.nbytes(), steps=self.optimizer.steps, **self._counters)

    # -- checks -----------------------------------------------------------------------------

    def _slots_or_owner_check(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Fixed: the ids' slots. Dynamic: None. Either way, raises unless every id is on
        this server."""
        if self.layout is not None:
            server, slots = self.layout.place(ids)
        else:
            server, slots = tables_lib.dynamic_server_of(self.name, ids, self.config.num_servers), None
        wrong = (server != self.config.server_index).nonzero()
        if wrong.numel():
            raise TableIdError(self.name, int(ids[wrong[0, 0]]),
                               f"is not on server {self.config.server_index}")
        return slots

    # -- lookups ----------------------------------------------------------------------------

    def lookup(self, ids: torch.Tensor, *, count: bool = True) -> torch.Tensor:
        """The rows [n, dim] (a copy) of `ids` (strictly increasing int64, all on this server).

        Dynamic tables: ids not held are sighted (when `count`; a retried pull of the same
        batch passes False), and get a row if admitted and there is room; ids still without a
        row read as zeros. Every id with a row is touched at the current step.

        Raises: TableRowsError (malformed ids), TableIdError (out of range, or not on this
        server).
        """
        tables_lib.check_ids(self.name, ids, self.config.num_embeddings, unique_sorted=True)
        ids = ids.to(torch.int64)
        with self._lock:
            slots = self._slots_or_owner_check(ids)
            if slots is not None:
                return self._store.weights.index_select(0, slots)
            return self._lookup_dynamic(ids, count)

    def _lookup_dynamic(self, ids: torch.Tensor, count: bool) -> torch.Tensor:
        store, step = self._store, self.optimizer.steps
        slots = store.find(ids)
        store.touch(slots[slots >= 0], step)
        missing = (slots < 0).nonzero().flatten()
        if missing.numel():
            new = ids.index_select(0, missing)
            if self.sketch is not None:
                seen = self.sketch.add(new) if count else self.sketch.estimate(new)
                missing_admitted = missing[seen >= self.config.admit_after]
            else:
                missing_admitted = missing
            fit, moved = self._make_room(missing_admitted.numel(), step)
            admitted = missing_admitted[:fit]
            if moved:  # evicting moved rows between slots
                slots = store.find(ids)
            if admitted.numel():
                new = ids.index_select(0, admitted)
                cfg = self.config
                rows = tables_lib.init_rows(cfg.seed, cfg.name, new, cfg.dim, cfg.init)
                slots.index_copy_(0, admitted, store.append(new, rows, step))
                self._counters["admissions"] += admitted.numel()
            self._counters["unadmitted_reads"] += missing.numel() - admitted.numel()
        out = torch.zeros((ids.numel(), self.dim))
        held = (slots >= 0).nonzero().flatten()
        out.index_copy_(0, held, store.weights.index_select(0, slots.index_select(0, held)))
        return out

    def _make_room(self, wanted: int, step: int) -> tuple[int, bool]:
        """Evicts for the cap so that `wanted` new rows fit, as far as rows not touched at
        `step` allow; returns (how many fit, whether rows were evicted)."""
        cap, store = self.row_cap, self._store
        if not cap or store.rows + wanted <= cap:
            return wanted, False
        need = min(store.rows + wanted - cap + cap // CAP_SLACK, store.rows)
        victims = store.least_recent(need, before=step)
        store.evict(victims)
        self._counters["evicted_cap"] += victims.numel()
        return min(wanted, cap - store.rows), victims.numel() > 0

    # -- updates ----------------------------------------------------------------------------

    def apply(self, ids: torch.Tensor, grads: torch.Tensor, lr: float | None = None) -> int:
        """One optimizer step of the table with a coalesced gradient: strictly increasing ids
        on this server and their rows [n, dim] (fp32, finite). The step counts even when no
        row is held here. Rows not held (a dynamic id not admitted, or evicted) drop their
        gradient. Then rows idle for `evict_after_steps` steps are evicted. Returns the number
        of rows updated.

        Raises: TableRowsError, TableIdError.
        """
        tables_lib.check_ids(self.name, ids, self.config.num_embeddings, unique_sorted=True)
        tables_lib.check_rows(self.name, ids, grads, self.dim)
        ids = ids.to(torch.int64)
        store = self._store
        with self._lock:
            slots = self._slots_or_owner_check(ids)
            if slots is None:
                slots = store.find(ids)
                held = (slots >= 0).nonzero().flatten()
                self._counters["dropped_rows"] += ids.numel() - held.numel()
                if held.numel() < ids.numel():
                    slots, grads = slots.index_select(0, held), grads.index_select(0, held)
                store.touch(slots, self.optimizer.steps)
            self.optimizer.step(store.weights, store.state, slots, grads, lr)
            store.mark(slots)
            if store.dynamic:
                if self.config.evict_after_steps:
                    before = self.optimizer.steps - self.config.evict_after_steps
                    self._counters["evicted_idle"] += store.evict_idle(before)
                if self.sketch is not None:
                    self.sketch.tick(self.optimizer.steps)
            return slots.numel()

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        """Fixed tables: sets slots [start, start + len(rows)) (initial weights, in slot order:
        FixedLayout.ids_on gives their ids)."""
        if self.layout is None:
            raise ValueError(f"table {self.name!r} is dynamic: its rows start from init_rows")
        tables_lib.check_rows(self.name, torch.empty(rows.shape[0]), rows, self.dim)
        with self._lock:
            if not 0 <= start <= start + rows.shape[0] <= self._store.rows:
                raise ValueError(f"table {self.name!r}: slots [{start}, {start + rows.shape[0]}) "
                                 f"outside [0, {self._store.rows})")
            self._store.weights[start : start + rows.shape[0]] = rows
            self._store.mark_range(start, start + rows.shape[0])

    # -- export and checkpoints -------------------------------------------------------------

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids ascending, rows) of every row held (copies)."""
        with self._lock:
            store = self._store
            if self.layout is not None:
                ids = self.layout.ids_on(self.config.server_index)
            else:
                ids = store.ids[: store.rows]
            ids, order = torch.sort(ids)
            return ids, store.weights.index_select(0, order)

    def export_page(self, after: int | None, limit: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """A dynamic table's (ids ascending, rows) of at most `limit` held ids greater than
        `after` (None: from the smallest), and whether greater ids remain. O(rows held) per
        call; reads without counting or touching anything."""
        if self.layout is not None:
            raise ValueError(f"table {self.name!r} is fixed: read it by id")
        with self._lock:
            return _page(self._store, after, limit)

    def rows_in_slot_order(self) -> torch.Tensor:
        """A fixed table's rows as held (proto.tables.assemble_fixed takes them)."""
        with self._lock:
            return self._store.weights[: self._store.rows].clone()

    def capture(self, changed_only: bool = False, new_base: bool = False) -> TableState:
        """A copy of everything a checkpoint holds; a dynamic table's rows sorted by id, so
        equal tables capture equal tensors. A fixed table's `changed_only`: only the slots
        changed since the last `new_base` capture (table_delta.py), which starts that anew."""
        with self._lock:
            store = self._store
            tensors = store.changed_tensors() if changed_only else store.sorted_tensors()
            if new_base:
                store.clear_changed()
            sketch = None
            if self.sketch is not None:
                tensors["sketch"], sketch = self.sketch.state()
            return TableState(self.config, self.optimizer.hyper(), dict(self._counters), tensors, sketch)

    @classmethod
    def from_state(cls, state: TableState) -> TableShard:
        """The shard as `capture` saw it (ValueError if the tensors do not fit the config)."""
        # A server-initialised table's rows come from the state: built as zeros, not filled.
        build = dataclasses.replace(state.config, server_init=False)
        shard = cls(build, make_optimizer(state.optimizer))
        shard.config = state.config
        shard.restore(state)
        return shard

    def restore(self, state: TableState) -> None:
        """Takes a capture of a table of this config in place (a rollback or a restart): its
        rows, optimizer state and step count, counters and admission sketch. The config and
        the optimizer's hyper-parameters stay this table's. Raises ValueError, changing
        nothing, if the capture does not fit (`check`)."""
        with self._lock:
            sketch = _restorable(self, self._store, state)
            self._store.load(state.tensors)
            self.sketch = sketch
            self.optimizer.steps = int(state.optimizer["steps"])
            self._counters = {k: int(state.counters.get(k, 0)) for k in self._counters}

    def check(self, state: TableState) -> None:
        """ValueError unless `restore` can take `state`; changes nothing."""
        with self._lock:
            _restorable(self, self._store, state)


def _restorable(table: TableShard, store: RowStore, state: TableState) -> CountMinSketch | None:
    """Checks a capture against a table (its lock held) and its store; returns the sketch it
    restores to. ValueError naming the table if it does not fit."""
    want = {"weights", *(f"state.{k}" for k in store.state)}
    want |= {"ids", "last"} if store.dynamic else set()
    want |= {"sketch"} if table.sketch is not None else set()
    if not want - {"sketch"} <= set(state.tensors):
        raise ValueError(f"table {table.name!r}: checkpoint tensors {sorted(state.tensors)}, "
                         f"expected {sorted(want)}")
    store.check(state.tensors)
    if set(state.tensors) != want:
        raise ValueError(f"table {table.name!r}: checkpoint tensors {sorted(state.tensors)}, "
                         f"expected {sorted(want)}")
    rows = state.tensors["weights"].shape[0]
    if table.row_cap and rows > table.row_cap:
        raise ValueError(f"table {table.name!r}: checkpoint holds {rows} rows, over the cap of "
                         f"{table.row_cap}")
    if table.sketch is None:
        return None
    meta = {"width": table.sketch.width, "depth": table.sketch.depth,
            "halve_every": table.sketch.halve_every,
            "halved_at": (state.sketch or {}).get("halved_at", 0)}
    return CountMinSketch.from_state(state.tensors["sketch"], meta)


def _fixed_store(config: TableConfig, layout: FixedLayout, weights: torch.Tensor | None,
                 shapes: dict[str, tuple[int, ...]], initial: dict[str, float],
                 row_bytes: int) -> RowStore:
    """A fixed table's store on this server: `weights` (checked, taken over); if None, rows from
    init_fixed_rows when `config.server_init`, else zeros. TableMemoryError if it cannot be
    allocated."""
    n = layout.rows_on(config.server_index)
    try:
        if weights is None:  # built here: finite by construction, no check over them all
            weights = (tables_lib.init_fixed_rows(
                config.seed, config.name, layout.num_embeddings, config.dim, config.init,
                padding_idx=config.padding_idx, layout=layout, server=config.server_index)
                if config.server_init else torch.zeros((n, config.dim)))
        else:
            tables_lib.check_rows(config.name, torch.empty(n), weights, config.dim)
        return RowStore(config.dim, shapes, initial, weights=weights)
    except RuntimeError:  # torch's allocator: "can't allocate memory"
        raise TableMemoryError(
            f"table {config.name!r}: cannot allocate its {n} rows on this server "
            f"({n * row_bytes / 2**30:.1f} GiB of rows and optimizer state)") from None


def _page(store: RowStore, after: int | None, limit: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """TableShard.export_page over a dynamic table's store (its lock held)."""
    ids = store.ids[: store.rows]
    slots = (ids > after).nonzero().flatten() if after is not None else torch.arange(ids.numel())
    if slots.numel() > limit:
        chosen = torch.topk(ids.index_select(0, slots), limit, largest=False, sorted=True)
        return chosen.values, store.weights.index_select(0, slots[chosen.indices]), True
    page, order = torch.sort(ids.index_select(0, slots))
    return page, store.weights.index_select(0, slots[order]), False


def _row_cap(config: TableConfig, row_bytes: int) -> int:
    """A dynamic table's cap on this server's rows (0: none): the least of max_rows and the
    rows max_bytes holds. ValueError if max_bytes holds no row."""
    by_bytes = config.max_bytes // row_bytes
    if config.max_bytes and not by_bytes:
        raise ValueError(f"table {config.name!r}: max_bytes {config.max_bytes} holds no row "
                         f"of {row_bytes} bytes")
    caps = [c for c in (config.max_rows, by_bytes) if c]
    return min(caps) if caps else 0
