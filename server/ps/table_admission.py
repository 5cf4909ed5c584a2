"""Admission counters of a dynamic table: how often each id not yet held has been seen.

A count-min sketch (Cormode and Muthukrishnan 2005) with conservative update: `depth` rows of
`width` int32 counters, fixed memory (depth * width * 4 bytes, 16 MiB at the defaults)
whatever the number of distinct ids. An id's count is the least of its `depth` counters, so
it never under-counts: an id seen k times is admitted at its k-th sighting at the latest, and
a rare id may be admitted early when every one of its counters is shared with busier ids (at
the defaults that needs about a million distinct ids in flight per table and server before it
is common). Conservative update (raise only the counters below the new estimate) keeps that
over-count low. Counters saturate at 2**31 - 1.

With `halve_every` > 0, every counter is halved each `halve_every` steps, so that ids seen
long ago must be seen again (TinyLFU's aging); 0 keeps counts forever.

Deterministic: a function of the ids added, in order. The whole state is one tensor (`counts`)
and two ints, captured and restored by the table. Not thread-safe: the table's lock guards it.
"""

from __future__ import annotations

import torch

from shardps.proto.tables import GOLDEN_GAMMA, int64_of, mix64, shr_logical

DEFAULT_WIDTH = 1 << 20
DEFAULT_DEPTH = 4
_MAX = (1 << 31) - 1
_SALT = int64_of(0x8CB92BA72F3D8DD7)


class CountMinSketch:
    def __init__(self, width: int = DEFAULT_WIDTH, depth: int = DEFAULT_DEPTH, halve_every: int = 0):
        if width < 64 or width & (width - 1):
            raise ValueError(f"sketch width must be a power of two >= 64, got {width}")
        if not 1 <= depth <= 8:
            raise ValueError(f"sketch depth must be in [1, 8], got {depth}")
        if halve_every < 0:
            raise ValueError(f"halve_every must be >= 0, got {halve_every}")
        self.width, self.depth, self.halve_every = width, depth, halve_every
        self.counts = torch.zeros((depth, width), dtype=torch.int32)
        self.halved_at = 0  # the step of the last halving

    def nbytes(self) -> int:
        return self.counts.numel() * 4

    def _cells(self, ids: torch.Tensor) -> torch.Tensor:
        """Flat counter index [depth, n]: row r's counter is the top log2(width) bits of
        mix64(mix64(id ^ SALT) + r * GOLDEN), i.e. draw r of a splitmix64 stream per id."""
        h = mix64(ids.to(torch.int64) ^ _SALT)
        shift = 64 - (self.width.bit_length() - 1)
        return torch.stack([shr_logical(mix64(h + int64_of(r * GOLDEN_GAMMA)), shift) + r * self.width
                            for r in range(self.depth)])

    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """The count (int64) of each id: never below the true count."""
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        cells = self._cells(ids)
        flat = self.counts.view(-1)
        return flat.index_select(0, cells.flatten()).view(cells.shape).amin(0).to(torch.int64)

    def add(self, ids: torch.Tensor) -> torch.Tensor:
        """Counts one sighting of each id (distinct ids); returns their new counts (int64)."""
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        cells = self._cells(ids)
        flat = self.counts.view(-1)
        current = flat.index_select(0, cells.flatten()).view(cells.shape)
        new = (current.amin(0).to(torch.int64) + 1).clamp_(max=_MAX)
        # Conservative update: each counter rises to the new estimate if it is below it; where
        # ids share a counter it takes the largest of their new estimates.
        target = new.to(torch.int32).expand_as(cells).flatten()
        flat.scatter_reduce_(0, cells.flatten(), target, reduce="amax")
        return new

    def tick(self, step: int) -> None:
        """The table reached `step`: halves every counter when `halve_every` steps have passed."""
        if self.halve_every and step - self.halved_at >= self.halve_every:
            self.counts.bitwise_right_shift_(1)
            self.halved_at = step

    def state(self) -> tuple[torch.Tensor, dict]:
        return self.counts.clone(), {"width": self.width, "depth": self.depth,
                                     "halve_every": self.halve_every, "halved_at": self.halved_at}

    @classmethod
    def from_state(cls, counts: torch.Tensor, meta: dict) -> CountMinSketch:
        sketch = cls(meta["width"], meta["depth"], meta["halve_every"])
        if counts.shape != sketch.counts.shape or counts.dtype != torch.int32:
            raise ValueError(f"sketch counts {counts.dtype} {tuple(counts.shape)} do not match "
                             f"{sketch.depth}x{sketch.width} int32")
        sketch.counts.copy_(counts)
        sketch.halved_at = int(meta["halved_at"])
        return sketch
