"""The deterministic data order: which training samples form global batch t and rank r's slice.

The training stream is the training split repeated epoch after epoch (each epoch permuted by
`randperm(n, generator=seed + e)` when shuffling). Global batch t is stream positions
[t*B, (t+1)*B), wrapping across epochs; rank r of K takes the r-th contiguous slice of it.
So K workers' slices, concatenated in rank order, are exactly the single-process batch.
"""

from __future__ import annotations

import math

import torch


def slice_bounds(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's slice within a global batch.

    Sizes differ by at most one, earlier ranks larger; with more ranks than samples the last
    ranks get empty slices.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def steps_for_epochs(max_epochs: float, n: int, batch_size: int) -> int:
    """Global steps that cover max_epochs passes over n samples (0 epochs: 0, unbounded)."""
    if max_epochs <= 0:
        return 0
    return max(1, math.ceil(max_epochs * n / batch_size))


class BatchOrder:
    """Sample indices of any global batch or slice of it, for one training split.

    Threading: not thread-safe (caches the permutations of the epochs it last touched).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n {n}, batch_size {batch_size}")
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample order of one epoch: a seeded permutation, or 0..n-1 without shuffle."""
        if not self.shuffle:
            return torch.arange(self.n)
        if epoch not in self._perms:
            if len(self._perms) >= 4:  # a batch spans at most a few epochs; keep the cache tiny
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Sample indices at stream positions [start, end)."""
        pos = torch.arange(start, end)
        if len(pos) == 0:
            return pos
        epochs = pos // self.n
        out = torch.empty_like(pos)
        for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
            mask = epochs == epoch
            out[mask] = self.epoch_order(epoch)[pos[mask] - epoch * self.n]
        return out

    def batch(self, step: int) -> torch.Tensor:
        """Sample indices of global batch `step`."""
        return self.positions(step * self.batch_size, (step + 1) * self.batch_size)

    def slice(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        """Sample indices of rank's slice of global batch `step`."""
        lo, hi = slice_bounds(self.batch_size, rank, world_size)
        base = step * self.batch_size
        return self.positions(base + lo, base + hi)

    def epoch_of(self, step: int) -> float:
        """Epochs completed at the start of global batch `step`."""
        return step * self.batch_size / self.n
