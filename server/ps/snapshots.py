"""Copy-on-write snapshots of one shard's weights for pulls.

A pull reads the live weights in place while they stay at its version; a step that changes
them first copies them for the snapshots still held (`detach_readers_locked`), so a pull costs
no full copy unless an apply overlaps it. Pulls of one version and dtype share one entry.

Thread-safety: the shard's condition (its lock) is passed in and guards every entry. Methods
named `..._locked` expect the caller to hold it; the others take it. Ownership: the weights
are the shard's; copies come from and go back to the shard's buffer pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .buffers import BufferPool

_T = TypeVar("_T")


class _CachedCopy:
    """The weights of one version in one dtype, shared by every pull of that version: the live
    weights themselves (`tensor` None) until a step copies them for the pulls still reading."""

    def __init__(self, version: int, dtype: torch.dtype):
        self.tensor: torch.Tensor | None = None
        self.version = version
        self.dtype = dtype
        self.refs = 0


@dataclass(frozen=True)
class Snapshot:
    """One version of the weights in a wire dtype; hand it back with `Shard.release`.

    Read it with `Shard.read`, a range at a time. `tensor` is a whole copy, made on first use.
    """

    version: int
    job_done: bool
    dtype: torch.dtype
    _entry: _CachedCopy
    _cache: SnapshotCache

    @property
    def tensor(self) -> torch.Tensor:
        return self._cache.materialize(self._entry)


class SnapshotCache:
    """The snapshot entries of one shard, at most one per dtype (of the newest version)."""

    def __init__(self, lock: threading.Condition, weights: torch.Tensor, pool: BufferPool):
        self._lock = lock
        self._weights = weights
        self._pool = pool
        self._copies: dict[torch.dtype, _CachedCopy] = {}

    def take_locked(self, version: int, job_done: bool, dtype: torch.dtype) -> Snapshot:
        """A snapshot of the weights as they are now (at `version`), in `dtype`."""
        entry = self._copies.get(dtype)
        if entry is None or entry.version != version:
            if entry is not None and entry.refs == 0 and entry.tensor is not None:
                self._pool.release(entry.tensor)
            entry = _CachedCopy(version, dtype)
            self._copies[dtype] = entry
        entry.refs += 1
        return Snapshot(entry.version, job_done, dtype, entry, self)

    def read(self, snapshot: Snapshot, start: int, end: int,
             fn: Callable[[torch.Tensor], _T]) -> _T:
        """fn(view of elements [start, end) of the snapshot), called under the lock."""
        with self._lock:
            entry = snapshot._entry
            source = entry.tensor if entry.tensor is not None else self._weights
            return fn(source[start:end])

    def materialize(self, entry: _CachedCopy) -> torch.Tensor:
        """The entry as a tensor of its own (copied now if it still is the live weights)."""
        with self._lock:
            if entry.tensor is None:  # still the live weights (a step would have copied them)
                entry.tensor = self._pool.acquire(entry.dtype)
                entry.tensor.copy_(self._weights)
            return entry.tensor

    def detach_readers_locked(self) -> None:
        """Before the weights change: snapshots still reading them in place get a copy."""
        for entry in self._copies.values():
            if entry.tensor is None and entry.refs > 0:
                entry.tensor = self._pool.acquire(entry.dtype)
                entry.tensor.copy_(self._weights)

    def release(self, snapshot: Snapshot) -> None:
        """Hands back a snapshot; its tensor must not be used afterwards."""
        with self._lock:
            entry = snapshot._entry
            entry.refs -= 1
            if (entry.refs == 0 and entry.tensor is not None
                    and self._copies.get(entry.dtype) is not entry):
                self._pool.release(entry.tensor)

    def clear_locked(self) -> None:
        """Forgets every entry; snapshots still held are released as stale ones."""
        self._copies.clear()
