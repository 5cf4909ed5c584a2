"""RowStore: a table shard's rows and their optimizer state, in tensors (no object per row).

The weights [capacity, dim] fp32 and each optimizer state tensor [capacity, ...] fp32 are
slot-aligned; rows fill slots [0, rows). A fixed table's store is exactly its rows. A dynamic
table's store also keeps, per slot, the row's id and the step it was last touched (int64
each), and an IdIndex from id to slot; it grows by half when full (never past `max_rows`) and
halves when under a quarter used, so its memory follows the rows held.

Evicting moves the last rows into the freed slots: no free list, the rows held are always a
prefix (what a checkpoint copies), and nothing depends on which slot a row sits in.

A fixed table's store also tracks which slots changed (`changed`, a bool per slot) since the
last `clear_changed`, for incremental checkpoints (table_delta.py): `mark` after an update,
and `load` and writes of whole ranges mark theirs.

Policy (what to create or evict, when) is the TableShard's; this is storage only. Not
thread-safe: the shard's lock guards it.
"""

from __future__ import annotations

import math

import torch

from .table_index import IdIndex

MIN_CAPACITY = 1024


class RowStore:
    def __init__(self, dim: int, state_shapes: dict[str, tuple[int, ...]],
                 initial_state: dict[str, float], *, weights: torch.Tensor | None = None,
                 max_rows: int = 0):
        """Fixed: `weights` given (taken over), every slot a row. Dynamic: `weights` None,
        empty, at most `max_rows` rows (0: no cap)."""
        self.dim = dim
        self._shapes = state_shapes
        self._initial = initial_state
        self.max_rows = max_rows
        self.dynamic = weights is None
        if weights is not None:
            self.rows = weights.shape[0]
            self.weights = weights.contiguous()
            self.state = self._alloc_state(self.rows)
            self.fill_state(0, self.rows)
            self.changed = torch.ones(self.rows, dtype=torch.bool)  # nothing captured yet
            return
        self.rows = 0
        capacity = min(MIN_CAPACITY, max_rows) if max_rows else MIN_CAPACITY
        self.weights = torch.zeros((capacity, dim))
        self.state = self._alloc_state(capacity)
        self.ids = torch.zeros(capacity, dtype=torch.int64)
        self.last = torch.zeros(capacity, dtype=torch.int64)
        self.index = IdIndex()
        self.oldest: float = math.inf  # a lower bound of `last` over the rows held

    @property
    def capacity(self) -> int:
        return self.weights.shape[0]

    def nbytes(self) -> int:
        """Resident bytes (allocated capacity, not rows held)."""
        total = self.weights.numel() * 4 + sum(t.numel() * 4 for t in self.state.values())
        if self.dynamic:
            total += (self.ids.numel() + self.last.numel()) * 8 + self.index.nbytes()
        return total

    def _alloc_state(self, capacity: int) -> dict[str, torch.Tensor]:
        return {k: torch.zeros((capacity, *shape)) for k, shape in self._shapes.items()}

    def fill_state(self, start: int, end: int) -> None:
        """Slots [start, end) of the optimizer state take a new row's initial values."""
        for key, tensor in self.state.items():
            tensor[start:end] = self._initial.get(key, 0.0)

    def _resize(self, capacity: int) -> None:
        n = self.rows

        def moved(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype)
            out[:n] = t[:n]
            return out

        self.weights = moved(self.weights)
        self.state = {k: moved(t) for k, t in self.state.items()}
        self.ids, self.last = moved(self.ids), moved(self.last)

    # -- dynamic rows ---------------------------------------------------------------------

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """The slot of each id, -1 where not held."""
        return self.index.lookup(ids)

    def touch(self, slots: torch.Tensor, step: int) -> None:
        self.last.index_fill_(0, slots, step)

    def append(self, ids: torch.Tensor, weights: torch.Tensor, step: int) -> torch.Tensor:
        """New rows (ids not held, distinct; room under max_rows is the caller's) touched at
        `step`, optimizer state at its initial values; returns their slots."""
        n, m = self.rows, ids.numel()
        if n + m > self.capacity:
            grown = max(n + m, math.ceil(self.capacity * 1.5))
            self._resize(min(grown, self.max_rows) if self.max_rows else grown)
        slots = torch.arange(n, n + m)
        self.weights[n : n + m] = weights
        self.fill_state(n, n + m)
        self.ids[n : n + m] = ids
        self.last[n : n + m] = step
        self.index.insert(ids, slots)
        self.rows = n + m
        self.oldest = min(self.oldest, step)
        return slots

    def evict(self, victims: torch.Tensor) -> None:
        """Drops the rows at `victims` (distinct slots), moving the last rows into the holes."""
        if victims.numel() == 0:
            return
        n = self.rows
        keep = n - victims.numel()
        self.index.remove(self.ids.index_select(0, victims))
        holes = torch.sort(victims[victims < keep]).values
        tail = torch.ones(n - keep, dtype=torch.bool)
        tail[victims[victims >= keep] - keep] = False
        movers = tail.nonzero().flatten() + keep  # rows past the end that stay, in slot order
        if holes.numel():
            for t in (self.weights, self.ids, self.last, *self.state.values()):
                t.index_copy_(0, holes, t.index_select(0, movers))
            self.index.update(self.ids.index_select(0, holes), holes)
        self.rows = keep
        if self.capacity > MIN_CAPACITY and keep < self.capacity // 4:
            self._resize(max(MIN_CAPACITY, self.capacity // 2))

    def least_recent(self, k: int, before: int) -> torch.Tensor:
        """Slots of up to k rows last touched before step `before`, least recent first (ties:
        smallest id), so the choice does not depend on where rows sit. O(rows)."""
        last = self.last[: self.rows]
        candidates = (last < before).nonzero().flatten()
        if candidates.numel() <= k:
            return candidates
        cand_last = last.index_select(0, candidates)
        threshold = int(torch.kthvalue(cand_last, k).values)
        below = candidates[cand_last < threshold]
        ties = candidates[cand_last == threshold]
        ties = ties[torch.argsort(self.ids.index_select(0, ties))][: k - below.numel()]
        return torch.cat([below, ties])

    def evict_idle(self, before: int) -> int:
        """Evicts every row last touched before step `before`; returns how many. Scans the rows
        only when `oldest` says one may be that old."""
        if self.oldest >= before or not self.rows:
            return 0
        victims = (self.last[: self.rows] < before).nonzero().flatten()
        self.evict(victims)
        self.oldest = int(self.last[: self.rows].min()) if self.rows else math.inf
        return victims.numel()

    # -- changed slots (fixed tables) -----------------------------------------------------

    def mark(self, slots: torch.Tensor) -> None:
        """Slots whose row or optimizer state was just written (no-op for a dynamic store)."""
        if not self.dynamic:
            self.changed.index_fill_(0, slots, True)

    def mark_range(self, start: int, end: int) -> None:
        if not self.dynamic:
            self.changed[start:end] = True

    def clear_changed(self) -> None:
        """Every slot counts as unchanged from now on (a full capture was just taken)."""
        if not self.dynamic:
            self.changed.zero_()

    def changed_tensors(self) -> dict[str, torch.Tensor]:
        """A fixed store's changed slots ("slots", int64 ascending) and copies of their rows
        ("weights", "state.<name>"): what `sorted_tensors` would add since the last
        `clear_changed`. Marks nothing."""
        if self.dynamic:
            raise ValueError("a dynamic table's changes are not tracked: capture it in full")
        slots = self.changed.nonzero().flatten()
        return {"slots": slots, "weights": self.weights.index_select(0, slots),
                **{f"state.{k}": t.index_select(0, slots) for k, t in self.state.items()}}

    # -- checkpoints ----------------------------------------------------------------------

    def sorted_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the rows held: dynamic ones sorted by id (with "ids" and "last"), so equal
        tables give equal tensors; fixed ones in slot order."""
        n = self.rows
        if not self.dynamic:
            return {"weights": self.weights.clone(),
                    **{f"state.{k}": t.clone() for k, t in self.state.items()}}
        order = torch.argsort(self.ids[:n])
        out = {"ids": self.ids[:n], "last": self.last[:n], "weights": self.weights[:n],
               **{f"state.{k}": t[:n] for k, t in self.state.items()}}
        return {k: t.index_select(0, order) for k, t in out.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Takes the rows `sorted_tensors` gave (ValueError, before any change, if their
        shapes do not fit: `check`)."""
        self.check(tensors)
        n = tensors["weights"].shape[0]
        if self.dynamic:
            if n > self.capacity:
                self._resize(n)
            self.ids[:n], self.last[:n] = tensors["ids"], tensors["last"]
            self.index.clear()
            self.index.insert(tensors["ids"], torch.arange(n))
            self.oldest = int(tensors["last"].min()) if n else math.inf
        else:
            self.changed.fill_(True)  # a load replaces every row: the next capture is full
        self.rows = n
        self.weights[:n] = tensors["weights"]
        for key, tensor in self.state.items():
            tensor[:n] = tensors[f"state.{key}"]

    def check(self, tensors: dict[str, torch.Tensor]) -> None:
        """ValueError unless `load` can take these tensors."""
        n = tensors["weights"].shape[0]
        for key, tensor in [("weights", self.weights), *((f"state.{k}", t) for k, t in self.state.items())]:
            saved = tensors[key]
            if saved.dtype != tensor.dtype or saved.shape[1:] != tensor.shape[1:]:
                raise ValueError(f"checkpoint {key} is {saved.dtype} {tuple(saved.shape)}")
            if saved.shape[0] != n or (not self.dynamic and n != self.rows):
                raise ValueError(f"checkpoint {key} holds {saved.shape[0]} rows, expected {self.rows}")
        if self.dynamic:
            if tensors["ids"].dtype != torch.int64 or tensors["ids"].shape != (n,) or \
                    tensors["last"].shape != (n,):
                raise ValueError("checkpoint ids and steps do not match its rows")
