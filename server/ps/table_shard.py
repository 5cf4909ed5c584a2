"""TableShard: the rows of one embedding table that one server holds, and their optimizer.

Pure core: no gRPC, no job. A pull calls `lookup(ids)`, a push (or a sync round's combined
gradient, table_optim.combine) calls `apply(ids, grads)`; checkpoints call `capture` and
`from_state`; export calls `rows` (fixed) or `export` (dynamic). docs/tables.md is the model.

Storage (no Python object per row): the weights [capacity, dim] fp32 and each optimizer state
tensor [capacity, ...] fp32, slot-aligned.
- Fixed table (ids in [0, N)): proto.tables.FixedLayout computes an id's server and slot, so
  the shard is exactly its rows_on(server) rows, with no per-row index or metadata.
- Dynamic table (any int64 id): rows fill slots [0, rows) densely; `_ids` and `_last` (int64
  per slot: the id, the step it was last touched) and an IdIndex (id -> slot) beside them.
  Evicting moves the last rows into the freed slots (so no free list: capture is a prefix,
  capacity can shrink, and nothing depends on which slot a row sits in). Capacity grows by
  half when full, never past the row cap, and halves when under a quarter used.

Rows of a dynamic table: created on lookup once admitted (the id's sightings reach
`admit_after`, counted by a CountMinSketch when that is > 1) with proto.tables.init_rows of
(seed, table, id); before that an id reads as zeros and its gradient is dropped. Evicted when
not touched (looked up or updated) for `evict_after_steps` steps, and least recently touched
first (ties: smallest id) when a lookup would take the table past its cap: then down to
1/64 under the cap, so the O(rows) scan for victims runs once per cap/64 new rows rather than
on every lookup. A lookup never evicts rows touched at the current step; when those alone
fill the cap, the new ids it cannot place read as zeros, and their gradients are dropped.

Steps: a table's step is the number of `apply` calls so far (its optimizer's step count);
lookups made before the next apply belong to that step.

Thread-safety: every public method takes the shard's lock.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field

import torch

from shardps.proto import tables as tables_lib
from shardps.proto.tables import FixedLayout, RowInit, TableIdError

from .table_admission import DEFAULT_DEPTH, DEFAULT_WIDTH, CountMinSketch
from .table_index import REBUILT_LOAD, IdIndex
from .table_optim import RowOptimizer, make_optimizer

META_BYTES_PER_ROW = 16      # a dynamic row's id and last-touched step (int64 each)
INDEX_BYTES_PER_ROW = math.ceil(16 / REBUILT_LOAD)  # IdIndex at its load after a rebuild
CAP_SLACK = 64               # evicting for the cap goes 1/64 of the cap below it
MIN_CAPACITY = 1024


@dataclass(frozen=True)
class TableConfig:
    """One table as one server holds it.

    Attributes:
        name: the table's name (the module's path in the model, e.g. "user_emb").
        dim: row width.
        num_embeddings: N for a fixed table (ids in [0, N)); None for a dynamic one.
        num_servers, server_index: the job's servers and which one this is.
        seed: the job's seed (dynamic rows' initial values).
        init: how a dynamic row starts.
        admit_after: sightings (lookups counted) before a dynamic id gets a row; 1 = first.
        evict_after_steps: evict dynamic rows untouched for this many steps; 0 = never.
        max_rows, max_bytes: cap on this server's rows of the table (0 = none); the byte cap
            counts `row_bytes` per row.
        sketch_width, sketch_depth, sketch_halve_every: admission counters (admit_after > 1).
    """

    name: str
    dim: int
    num_embeddings: int | None = None
    num_servers: int = 1
    server_index: int = 0
    seed: int = 0
    init: RowInit = field(default_factory=RowInit)
    admit_after: int = 1
    evict_after_steps: int = 0
    max_rows: int = 0
    max_bytes: int = 0
    sketch_width: int = DEFAULT_WIDTH
    sketch_depth: int = DEFAULT_DEPTH
    sketch_halve_every: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a table needs a name")
        if self.dim < 1:
            raise ValueError(f"table {self.name!r}: dim must be >= 1, got {self.dim}")
        if not 0 <= self.server_index < self.num_servers:
            raise ValueError(f"table {self.name!r}: server {self.server_index} of {self.num_servers}")
        if self.num_embeddings is not None:
            FixedLayout(self.name, self.num_embeddings, self.num_servers)  # validates N
            if (self.admit_after, self.evict_after_steps, self.max_rows, self.max_bytes) != (1, 0, 0, 0):
                raise ValueError(f"table {self.name!r}: admission, eviction and caps are for "
                                 "dynamic tables (num_embeddings None)")
        for key in ("admit_after", "evict_after_steps", "max_rows", "max_bytes"):
            if getattr(self, key) < (1 if key == "admit_after" else 0):
                raise ValueError(f"table {self.name!r}: bad {key} {getattr(self, key)}")

    @property
    def fixed(self) -> bool:
        return self.num_embeddings is not None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["init"] = asdict(self.init)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TableConfig:
        return cls(**{**d, "init": RowInit(**d["init"])})


@dataclass(frozen=True)
class TableStats:
    """A table shard's counters and sizes (the metrics' source)."""

    rows: int               # rows held
    capacity: int           # rows allocated
    bytes: int              # resident bytes: weights, state, metadata, index, sketch
    steps: int              # applies so far
    admissions: int = 0     # dynamic rows created
    evicted_idle: int = 0   # dynamic rows evicted for not being touched
    evicted_cap: int = 0    # dynamic rows evicted for the cap
    unadmitted_reads: int = 0   # ids looked up that read as zeros (not admitted, or no room)
    dropped_rows: int = 0   # gradient rows dropped (row not held)


class TableShard:
    def __init__(self, config: TableConfig, optimizer: RowOptimizer,
                 weights: torch.Tensor | None = None):
        """A fixed table's rows start as `weights` [rows_on(server), dim] (taken over; zeros
        if None, to be filled with `write_rows`); a dynamic table's start empty."""
        self.config = config
        self.name = config.name
        self.dim = config.dim
        self.optimizer = optimizer
        self._lock = threading.Lock()
        self._state_shapes = optimizer.state_shapes(config.dim)
        self.layout = (FixedLayout(config.name, config.num_embeddings, config.num_servers)
                       if config.num_embeddings is not None else None)
        self._counters = {"admissions": 0, "evicted_idle": 0, "evicted_cap": 0,
                          "unadmitted_reads": 0, "dropped_rows": 0}
        if self.layout is not None:
            n = self.layout.rows_on(config.server_index)
            if weights is None:
                weights = torch.zeros((n, config.dim))
            tables_lib.check_rows(self.name, torch.empty(n), weights, config.dim)
            self.rows = n
            self._weights = weights.contiguous()
            self._state = self._alloc_state(n)
            self._fill_state(0, n)
            return
        if weights is not None:
            raise ValueError(f"table {self.name!r}: a dynamic table starts empty")
        self.rows = 0
        self.row_cap = self._row_cap(config)
        capacity = min(MIN_CAPACITY, self.row_cap) if self.row_cap else MIN_CAPACITY
        self._weights = torch.zeros((capacity, config.dim))
        self._state = self._alloc_state(capacity)
        self._ids = torch.zeros(capacity, dtype=torch.int64)
        self._last = torch.zeros(capacity, dtype=torch.int64)
        self._index = IdIndex()
        self._oldest = math.inf  # a lower bound of _last over the rows held
        self.sketch = (CountMinSketch(config.sketch_width, config.sketch_depth,
                                      config.sketch_halve_every)
                       if config.admit_after > 1 else None)

    # -- sizes ----------------------------------------------------------------------------

    def _row_cap(self, config: TableConfig) -> int:
        by_bytes = config.max_bytes // self.row_bytes()
        if config.max_bytes and not by_bytes:
            raise ValueError(f"table {self.name!r}: max_bytes {config.max_bytes} holds no row "
                             f"of {self.row_bytes()} bytes")
        caps = [c for c in (config.max_rows, by_bytes) if c]
        return min(caps) if caps else 0

    def row_bytes(self) -> int:
        """Bytes per row held: weights and optimizer state, and for a dynamic table its id,
        last-touched step and its share of the index (at the load after a rebuild)."""
        per = 4 * self.dim + self.optimizer.state_bytes_per_row(self.dim)
        return per if self.layout is not None else per + META_BYTES_PER_ROW + INDEX_BYTES_PER_ROW

    @property
    def capacity(self) -> int:
        return self._weights.shape[0]

    def nbytes(self) -> int:
        """Resident bytes of this shard's tensors (allocated capacity, not rows held)."""
        total = self._weights.numel() * 4 + sum(t.numel() * 4 for t in self._state.values())
        if self.layout is None:
            total += (self._ids.numel() + self._last.numel()) * 8 + self._index.nbytes()
            total += self.sketch.nbytes() if self.sketch is not None else 0
        return total

    def stats(self) -> TableStats:
        with self._lock:
            return TableStats(rows=self.rows, capacity=self.capacity, bytes=self.nbytes(),
                              steps=self.optimizer.steps, **self._counters)

    @property
    def steps(self) -> int:
        return self.optimizer.steps

    # -- storage ----------------------------------------------------------------------------

    def _alloc_state(self, capacity: int) -> dict[str, torch.Tensor]:
        return {k: torch.zeros((capacity, *shape)) for k, shape in self._state_shapes.items()}

    def _fill_state(self, start: int, end: int) -> None:
        initial = self.optimizer.initial_state()
        for key, tensor in self._state.items():
            tensor[start:end] = initial.get(key, 0.0)

    def _resize(self, capacity: int) -> None:
        n = self.rows

        def moved(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype)
            out[:n] = t[:n]
            return out

        self._weights = moved(self._weights)
        self._state = {k: moved(t) for k, t in self._state.items()}
        self._ids, self._last = moved(self._ids), moved(self._last)

    # -- lookups ----------------------------------------------------------------------------

    def _check(self, ids: torch.Tensor) -> None:
        tables_lib.check_ids(self.name, ids, self.config.num_embeddings, unique_sorted=True)

    def _fixed_slots(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.layout is not None
        server, slots = self.layout.place(ids.to(torch.int64))
        self._check_owner(ids, server)
        return slots

    def _check_owner(self, ids: torch.Tensor, server: torch.Tensor) -> None:
        wrong = (server != self.config.server_index).nonzero()
        if wrong.numel():
            raise TableIdError(self.name, int(ids[wrong[0, 0]]),
                               f"is not on server {self.config.server_index}")

    def lookup(self, ids: torch.Tensor, *, count: bool = True) -> torch.Tensor:
        """The rows [n, dim] (a copy) of `ids` (strictly increasing int64, all on this server).

        Dynamic tables: ids not held are sighted (when `count`; a retried pull of the same
        batch passes False), and get a row if admitted and there is room; ids still without a
        row read as zeros. Every id with a row is touched at the current step.

        Raises (nothing changed): TableRowsError (malformed ids), TableIdError (out of range,
        or not on this server).
        """
        self._check(ids)
        ids = ids.to(torch.int64)
        with self._lock:
            if self.layout is not None:
                return self._weights.index_select(0, self._fixed_slots(ids))
            self._check_owner(ids, tables_lib.dynamic_server_of(
                self.name, ids, self.config.num_servers))
            return self._lookup_dynamic(ids, count)

    def _lookup_dynamic(self, ids: torch.Tensor, count: bool) -> torch.Tensor:
        step = self.optimizer.steps
        slots = self._index.lookup(ids)
        held = (slots >= 0).nonzero().flatten()
        self._last.index_fill_(0, slots.index_select(0, held), step)
        missing = (slots < 0).nonzero().flatten()
        if missing.numel():
            new = ids.index_select(0, missing)
            if self.sketch is not None:
                seen = self.sketch.add(new) if count else self.sketch.estimate(new)
                admitted = missing[seen >= self.config.admit_after]
            else:
                admitted = missing
            fit, moved = self._make_room(admitted.numel(), step)
            admitted = admitted[:fit]
            if moved:  # evicting moved rows between slots
                slots = self._index.lookup(ids)
            if admitted.numel():
                slots.index_copy_(0, admitted, self._create(ids.index_select(0, admitted), step))
            self._counters["unadmitted_reads"] += missing.numel() - admitted.numel()
        out = torch.zeros((ids.numel(), self.dim))
        held = (slots >= 0).nonzero().flatten()
        out.index_copy_(0, held, self._weights.index_select(0, slots.index_select(0, held)))
        return out

    def _make_room(self, wanted: int, step: int) -> tuple[int, bool]:
        """Evicts for the cap so that `wanted` new rows fit, as far as rows not touched at
        `step` allow; returns (how many fit, whether rows were evicted)."""
        cap = self.row_cap
        if not cap or self.rows + wanted <= cap:
            return wanted, False
        need = min(self.rows + wanted - cap + cap // CAP_SLACK, self.rows)
        victims = self._least_recent(need, before=step)
        self._evict(victims)
        self._counters["evicted_cap"] += victims.numel()
        return min(wanted, cap - self.rows), victims.numel() > 0

    def _least_recent(self, k: int, before: int) -> torch.Tensor:
        """Slots of up to k rows last touched before step `before`, least recent first (ties:
        smallest id), so the choice does not depend on where rows sit."""
        last = self._last[: self.rows]
        candidates = (last < before).nonzero().flatten()
        if candidates.numel() <= k:
            return candidates
        cand_last = last.index_select(0, candidates)
        threshold = int(torch.kthvalue(cand_last, k).values)
        below = candidates[cand_last < threshold]
        ties = candidates[cand_last == threshold]
        ties = ties[torch.argsort(self._ids.index_select(0, ties))][: k - below.numel()]
        return torch.cat([below, ties])

    def _create(self, new_ids: torch.Tensor, step: int) -> torch.Tensor:
        n, m = self.rows, new_ids.numel()
        if n + m > self.capacity:
            grown = max(n + m, math.ceil(self.capacity * 1.5))
            self._resize(min(grown, self.row_cap) if self.row_cap else grown)
        slots = torch.arange(n, n + m)
        cfg = self.config
        self._weights[n : n + m] = tables_lib.init_rows(cfg.seed, cfg.name, new_ids, cfg.dim, cfg.init)
        self._fill_state(n, n + m)
        self._ids[n : n + m] = new_ids
        self._last[n : n + m] = step
        self._index.insert(new_ids, slots)
        self.rows = n + m
        self._oldest = min(self._oldest, step)
        self._counters["admissions"] += m
        return slots

    def _evict(self, victims: torch.Tensor) -> None:
        """Drops the rows at `victims` (distinct slots), moving the last rows into the holes."""
        if victims.numel() == 0:
            return
        n = self.rows
        keep = n - victims.numel()
        self._index.remove(self._ids.index_select(0, victims))
        holes = victims[victims < keep]
        tail = torch.ones(n - keep, dtype=torch.bool)
        gone = victims[victims >= keep] - keep
        tail[gone] = False
        movers = tail.nonzero().flatten() + keep  # rows past the end that stay, in slot order
        holes = torch.sort(holes).values
        if holes.numel():
            for t in (self._weights, self._ids, self._last, *self._state.values()):
                t.index_copy_(0, holes, t.index_select(0, movers))
            self._index.update(self._ids.index_select(0, holes), holes)
        self.rows = keep
        if self.capacity > MIN_CAPACITY and keep < self.capacity // 4:
            self._resize(max(MIN_CAPACITY, self.capacity // 2))

    # -- updates ----------------------------------------------------------------------------

    def apply(self, ids: torch.Tensor, grads: torch.Tensor, lr: float | None = None) -> int:
        """One optimizer step of the table with a coalesced gradient: strictly increasing ids
        on this server and their rows [n, dim] (fp32, finite). The step counts even when no
        row is held here. Rows not held (a dynamic id not admitted, or evicted) drop their
        gradient. Then rows idle for `evict_after_steps` steps are evicted. Returns the number
        of rows updated.

        Raises (nothing changed): TableRowsError, TableIdError.
        """
        self._check(ids)
        tables_lib.check_rows(self.name, ids, grads, self.dim)
        ids = ids.to(torch.int64)
        with self._lock:
            if self.layout is not None:
                slots = self._fixed_slots(ids)
                self.optimizer.step(self._weights, self._state, slots, grads, lr)
                return slots.numel()
            self._check_owner(ids, tables_lib.dynamic_server_of(
                self.name, ids, self.config.num_servers))
            slots = self._index.lookup(ids)
            held = (slots >= 0).nonzero().flatten()
            self._counters["dropped_rows"] += ids.numel() - held.numel()
            if held.numel() < ids.numel():
                slots, grads = slots.index_select(0, held), grads.index_select(0, held)
            self._last.index_fill_(0, slots, self.optimizer.steps)
            self.optimizer.step(self._weights, self._state, slots, grads, lr)
            self._expire()
            if self.sketch is not None:
                self.sketch.tick(self.optimizer.steps)
            return slots.numel()

    def _expire(self) -> None:
        ttl = self.config.evict_after_steps
        horizon = self.optimizer.steps - ttl  # rows last touched before it are idle
        if not ttl or self._oldest >= horizon or not self.rows:
            return
        last = self._last[: self.rows]
        victims = (last < horizon).nonzero().flatten()
        self._evict(victims)
        self._counters["evicted_idle"] += victims.numel()
        self._oldest = int(self._last[: self.rows].min()) if self.rows else math.inf

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        """Fixed tables: sets slots [start, start + len(rows)) (initial weights, in slot order:
        FixedLayout.ids_on gives their ids)."""
        if self.layout is None:
            raise ValueError(f"table {self.name!r} is dynamic: its rows start from init_rows")
        tables_lib.check_rows(self.name, torch.empty(rows.shape[0]), rows, self.dim)
        with self._lock:
            if not 0 <= start <= start + rows.shape[0] <= self.rows:
                raise ValueError(f"table {self.name!r}: slots [{start}, {start + rows.shape[0]}) "
                                 f"outside [0, {self.rows})")
            self._weights[start : start + rows.shape[0]] = rows

    # -- export and checkpoints -------------------------------------------------------------

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids ascending, rows) of every row held (copies). For a fixed table the ids are
        FixedLayout.ids_on(server), sorted."""
        with self._lock:
            if self.layout is not None:
                ids = self.layout.ids_on(self.config.server_index)
                weights = self._weights
            else:
                ids, weights = self._ids[: self.rows], self._weights[: self.rows]
            ids, order = torch.sort(ids)
            return ids, weights.index_select(0, order)

    def rows_in_slot_order(self) -> torch.Tensor:
        """A fixed table's rows as held (proto.tables.assemble_fixed takes them)."""
        with self._lock:
            return self._weights[: self.rows].clone()

    def capture(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a checkpoint holds: tensors and a small JSON-able dict. A dynamic
        table's rows come sorted by id, so equal tables capture equal tensors."""
        with self._lock:
            meta = {"config": self.config.to_dict(), "optimizer": self.optimizer.hyper(),
                    "counters": dict(self._counters)}
            n = self.rows
            if self.layout is not None:
                tensors = {"weights": self._weights.clone()}
                tensors.update({f"state.{k}": t.clone() for k, t in self._state.items()})
                return tensors, meta
            order = torch.argsort(self._ids[:n])
            tensors = {"ids": self._ids[:n].index_select(0, order),
                       "last": self._last[:n].index_select(0, order),
                       "weights": self._weights[:n].index_select(0, order)}
            tensors.update({f"state.{k}": t[:n].index_select(0, order) for k, t in self._state.items()})
            if self.sketch is not None:
                tensors["sketch"], meta["sketch"] = self.sketch.state()
            return tensors, meta

    @classmethod
    def from_state(cls, config: TableConfig, tensors: dict[str, torch.Tensor], meta: dict) -> TableShard:
        """The shard as `capture` saw it. `config` must be the captured one (ValueError if not)."""
        if TableConfig.from_dict(meta["config"]) != config:
            raise ValueError(f"table {config.name!r}: checkpoint is of a different table config")
        optimizer = make_optimizer(meta["optimizer"])
        weights = tensors["weights"].clone()
        if config.fixed:
            shard = cls(config, optimizer, weights)
        else:
            shard = cls(config, optimizer)
            n = weights.shape[0]
            ids = tensors["ids"]
            if ids.dtype != torch.int64 or ids.shape != (n,):
                raise ValueError(f"table {config.name!r}: checkpoint ids do not match its rows")
            shard._resize(max(n, MIN_CAPACITY if not shard.row_cap else min(MIN_CAPACITY, shard.row_cap)))
            shard._weights[:n] = weights
            shard._ids[:n] = ids
            shard._last[:n] = tensors["last"]
            shard.rows = n
            shard._index.insert(ids, torch.arange(n))
            shard._oldest = int(tensors["last"].min()) if n else math.inf
            if shard.sketch is not None:
                shard.sketch = CountMinSketch.from_state(tensors["sketch"], meta["sketch"])
        for key, tensor in shard._state.items():
            saved = tensors[f"state.{key}"]
            if saved.shape[0] != shard.rows or saved.shape[1:] != tensor.shape[1:]:
                raise ValueError(f"table {config.name!r}: checkpoint state {key} does not match")
            tensor[: shard.rows] = saved
        shard._counters.update({k: int(v) for k, v in meta["counters"].items()})
        return shard
