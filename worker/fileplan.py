"""Which place (rank, world size) a worker reads each epoch of a file dataset with, while workers
join, leave or die: pure, no I/O, no clock.

Epochs are fixed spans of global steps, the same for every worker whatever the world size:
epoch e is steps [e * L, (e + 1) * L) with L = `epoch_length(train rows, global batch)`. A
worker reads epoch e with the place it held at the first step it took in that epoch, to the
epoch's end: a membership change takes effect at the next epoch, so the survivors of a death
finish their own files of the epoch (no file read twice in it) and the dead worker's unread
files are read in the next epoch, which every worker reads with the new places. A worker whose
first step is inside an epoch (it joined, or came back, mid-epoch) reads nothing in that epoch:
the others hold its files. `docs/data.md` ("Assignment when workers join or leave").
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Place:
    """A worker's rank among the `world` live workers of its job."""

    rank: int
    world: int


def epoch_length(num_train: int, batch_size: int) -> int:
    """Steps of every epoch: one pass over `num_train` rows in global batches of `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return max(1, math.ceil(num_train / batch_size))


class EpochPlaces:
    """The place this worker reads each epoch with, fixed by the first step it takes in it.

    `place(epoch, index, now)` answers for step `index` of `epoch`, `now` being the place the
    worker holds as it takes that step; asked again (a rewind, a rollback) for an epoch it has
    fixed, it gives the same answer whatever `now` is, so a step's batch is taken again as it was.
    None: the worker reads nothing that epoch (it is earlier than the worker's first epoch, or
    the worker's first step was inside it). Keeps the epochs where the place changed only (a
    job's membership changes), at most MAX_CHANGES of them. Not thread-safe (one training loop).
    """

    MAX_CHANGES = 10_000

    def __init__(self) -> None:
        self._first = -1  # the first epoch this worker took a step in (-1: none yet)
        self._last = -1  # the newest epoch whose place is fixed
        self._starts: list[int] = []  # epochs where the place changes, ascending
        self._places: list[Place | None] = []  # the place from each of those epochs on

    def place(self, epoch: int, index: int, now: Place) -> Place | None:
        if epoch < 0 or index < 0:
            raise ValueError(f"epoch and index must be >= 0, got {epoch}, {index}")
        if self._first < 0:  # the first step this worker takes
            self._first = epoch
            self._fix(epoch, epoch, now if index == 0 else None)
        elif epoch > self._last:  # a new epoch (and any it jumped over) takes the place held now
            self._fix(self._last + 1, epoch, now)
        if epoch < self._first:
            return None
        return self._places[bisect.bisect_right(self._starts, epoch) - 1]

    def _fix(self, start: int, last: int, place: Place | None) -> None:
        """Epochs start..last are read with `place`."""
        if not self._places or self._places[-1] != place:
            self._starts.append(start)
            self._places.append(place)
            if len(self._starts) > self.MAX_CHANGES:  # the oldest stands for the epochs before it
                del self._starts[1], self._places[0]
        self._last = last

    def fixed(self) -> list[tuple[int, Place | None]]:
        """(first epoch, place) of each change so far, oldest first (for logs and tests)."""
        return list(zip(self._starts, self._places, strict=True))
