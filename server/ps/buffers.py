"""Reusable flat tensors of one length: fresh 100 MB buffers cost page faults, reuse does not."""

from __future__ import annotations

import threading

import torch


class BufferPool:
    """Free lists of flat tensors of `numel` elements, one list per dtype.

    Thread-safe. A tensor returned by `acquire` belongs to the caller until it hands it back
    with `release`; the pool keeps at most `keep` free tensors per dtype and lets the rest go.
    """

    def __init__(self, numel: int, keep: int = 2):
        self.numel = numel
        self.keep = keep
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def acquire(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor of `numel` elements with undefined contents."""
        with self._lock:
            free = self._free.get(dtype)
            if free:
                return free.pop()
        return torch.empty(self.numel, dtype=dtype)

    def release(self, tensor: torch.Tensor) -> None:
        """Takes a tensor back for reuse; the caller must not touch it afterwards."""
        if tensor.dim() != 1 or tensor.numel() != self.numel or not tensor.is_contiguous():
            return
        with self._lock:
            free = self._free.setdefault(tensor.dtype, [])
            # A tensor listed twice would be handed to two owners at once.
            if len(free) < self.keep and all(t is not tensor for t in free):
                free.append(tensor)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
