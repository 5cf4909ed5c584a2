"""IdIndex: int64 id -> row slot for a dynamic table, held in two tensors (no object per id).

Open addressing with linear probing over a power-of-two number of buckets, one int64 tensor
`table` of [buckets, 2]: (id, slot) pairs, the slot being the row's slot, EMPTY or DELETED.
Key and slot side by side make a probe one random memory access. Every operation is
vectorised over a batch of ids: the first probe is a gather of every id's home bucket, and
the few ids that must probe on (about 10% at the load kept) loop over a shrinking subset as
many steps as the longest probe sequence of the batch.

Load: (live + deleted) buckets stay at most MAX_LOAD (0.6) of the buckets; past it, or when
removals leave live ids under MIN_LOAD (0.15), the index is rebuilt into the fewest 2 ** k
buckets with live / buckets <= REBUILT_LOAD (0.3), which grows, shrinks or clears deleted
marks. So it costs 16 bytes per bucket: 27 to 107 bytes per live id, 27 to 53 while the
table grows (docs/tables.md, "Memory per row"), and its memory follows the ids held.

The home bucket of an id is the top bits of (id ^ (id >>> 32)) * 0x9E3779B97F4A7C15
(Fibonacci hashing, after folding the high half into the low one so that ids differing only in
their high bits spread too): four ops where mix64 takes eleven. It has nothing to do with the
sharding hash, which every id on one server shares mod S.

Not thread-safe: the owning table's lock guards it.
"""

from __future__ import annotations

import torch

from shardps.proto.tables import GOLDEN_GAMMA, shr_logical

EMPTY = -1
DELETED = -2
MAX_LOAD = 0.6      # (live + deleted) / buckets that triggers a rebuild
REBUILT_LOAD = 0.3  # live / buckets at most, after a rebuild
MIN_LOAD = 0.15     # live / buckets below which removing shrinks the index
MIN_BUCKETS = 64


def _buckets_for(live: int) -> int:
    need = max(MIN_BUCKETS, int(live / REBUILT_LOAD) + 1)
    return 1 << (need - 1).bit_length()


class IdIndex:
    """A set of distinct int64 ids, each mapped to a non-negative slot."""

    def __init__(self, capacity: int = 0):
        self._alloc(_buckets_for(capacity))
        self.size = 0      # live ids
        self._deleted = 0  # DELETED buckets

    def _alloc(self, buckets: int) -> None:
        self.table = torch.zeros((buckets, 2), dtype=torch.int64)
        self.table[:, 1] = EMPTY
        self._mask = buckets - 1
        self._shift = 64 - (buckets.bit_length() - 1)

    @property
    def buckets(self) -> int:
        return self._mask + 1

    def nbytes(self) -> int:
        return self.table.numel() * 8

    def _home(self, ids: torch.Tensor) -> torch.Tensor:
        return shr_logical((ids ^ shr_logical(ids, 32)) * GOLDEN_GAMMA, self._shift)

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket, slot) of each id, both -1 where absent."""
        bucket = self._home(ids)
        entry = self.table.index_select(0, bucket)
        slot = entry[:, 1]
        hit = (slot >= 0) & (entry[:, 0] == ids)
        found = torch.where(hit, bucket, -1)
        slots = torch.where(hit, slot, -1)
        todo = (~hit & (slot != EMPTY)).nonzero().flatten()  # a DELETED bucket goes on too
        if todo.numel():
            bucket, keys = bucket.index_select(0, todo), ids.index_select(0, todo)
        while todo.numel():
            bucket = (bucket + 1) & self._mask
            entry = self.table.index_select(0, bucket)
            slot = entry[:, 1]
            hit = (slot >= 0) & (entry[:, 0] == keys)
            if bool(hit.any()):
                found.index_copy_(0, todo[hit], bucket[hit])
                slots.index_copy_(0, todo[hit], slot[hit])
            more = ~hit & (slot != EMPTY)
            todo, bucket, keys = todo[more], bucket[more], keys[more]
        return found, slots

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The slot (int64) of each id, -1 where the id is absent. Any int64 ids, duplicates
        allowed."""
        return self._find(ids.to(torch.int64))[1]

    def insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Adds distinct ids that are not in the index, with their slots (caller's promise)."""
        if ids.numel() == 0:
            return
        if self.size + self._deleted + ids.numel() > MAX_LOAD * self.buckets:
            self._rebuild(self.size + ids.numel())
        self._place(ids.to(torch.int64), slots.to(torch.int64))
        self.size += ids.numel()

    def _place(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        bucket = self._home(ids)
        while ids.numel():
            state = self.table[:, 1].index_select(0, bucket)
            cand = (state < 0).nonzero().flatten()  # EMPTY or DELETED (the ids are absent)
            left = torch.ones(ids.shape, dtype=torch.bool)
            if cand.numel():
                # Several ids may want one bucket: the first of them (in batch order) wins.
                taken, order = torch.sort(bucket.index_select(0, cand), stable=True)
                first = torch.ones_like(taken, dtype=torch.bool)
                first[1:] = taken[1:] != taken[:-1]
                win = cand.index_select(0, order[first])
                won = bucket.index_select(0, win)
                self._deleted -= int((state.index_select(0, win) == DELETED).sum())
                self.table.index_copy_(0, won, torch.stack([ids.index_select(0, win),
                                                            slots.index_select(0, win)], dim=1))
                left[win] = False
            ids, slots, bucket = ids[left], slots[left], (bucket[left] + 1) & self._mask

    def remove(self, ids: torch.Tensor) -> None:
        """Drops distinct ids (absent ones are ignored)."""
        bucket = self._find(ids.to(torch.int64))[0]
        bucket = bucket[bucket >= 0]
        if bucket.numel() == 0:
            return
        self.table[:, 1].index_fill_(0, bucket, DELETED)
        self.size -= bucket.numel()
        self._deleted += bucket.numel()
        if self.buckets > MIN_BUCKETS and self.size < MIN_LOAD * self.buckets:
            self._rebuild(self.size)  # shrink: memory follows the ids held

    def update(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Moves ids that are in the index to new slots."""
        bucket = self._find(ids.to(torch.int64))[0]
        if bool((bucket < 0).any()):
            raise KeyError("update of an id that is not in the index")
        self.table[:, 1].index_copy_(0, bucket, slots.to(torch.int64))

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, slots) of every live entry, in bucket order."""
        live = (self.table[:, 1] >= 0).nonzero().flatten()
        entries = self.table.index_select(0, live)
        return entries[:, 0].clone(), entries[:, 1].clone()

    def _rebuild(self, live: int) -> None:
        ids, slots = self.items()
        self._alloc(_buckets_for(live))
        self._deleted = 0
        if ids.numel():
            self._place(ids, slots)

    def clear(self) -> None:
        self._alloc(MIN_BUCKETS)
        self.size = self._deleted = 0
