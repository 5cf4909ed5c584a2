"""A worker's own momentum of its pushes (optimizer.worker_momentum, 1-bit Adam's scheme):
what a worker compresses, instead of g / D, once the servers' variance is frozen.

Why: on the daemons' 128-64 MLP g / D is heavy-tailed and grows after the freeze, so one sign
scale per block fits few of its elements and sign pushes of g / D never reach the target; the
momentum is a smoother signal, which sign with error feedback carries well (docs/network.md,
"Worker momentum", has the measurements).

Per shard (named as the residuals are): during the warm-up m = beta1 m + (1 - beta1) g, in
the gradient's units, so that the workers' momenta average to the servers' Adam momentum; at
the worker's first frozen step m is divided by D once, and from then on
m = beta1 m + (1 - beta1) g / D. Each push is m / (1 - beta1^k), k the steps this momentum has
summed: corrected for its start at 0 on this worker, which need not be the job's step 0 (a
worker that restarts, or a rollback, starts its momentum again at 0). Pure and deterministic;
not thread-safe (owned by the job's training thread, as WirePush is).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from shardps.proto.compress import CHUNK

Fill = Callable[[int, int, torch.Tensor, bool], None]  # fill(lo, hi, out, add): WorkerMomentum.frozen


@dataclass
class _Momentum:
    value: torch.Tensor  # fp32, the shard's length
    count: int  # steps summed since it started at 0
    preconditioned: bool  # in g / D's units (else the gradient's: warm-up steps only so far)
    corrected: torch.Tensor | None = None  # what step() returns, kept to spare a fresh buffer a step


class WorkerMomentum:
    """One worker's momentum per shard, for one job. `beta1`: Adam's, from the job spec."""

    def __init__(self, beta1: float):
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        self.beta1 = beta1
        self._shards: dict[str, _Momentum] = {}

    def warm(self, name: str, grad: torch.Tensor) -> None:
        """A warm-up step (the push itself goes uncompressed): m = beta1 m + (1 - beta1) g."""
        self._add(self._of(name, grad, preconditioned=False), grad)

    def step(self, name: str, grad: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        """A frozen step on shard `name`: its bias-corrected momentum of g / denom (fp32, what
        the worker compresses; this shard's buffer, valid until its next step). A momentum
        still in the gradient's units (the warm-up's) is divided by denom first."""
        fill = self.frozen(name, grad, denom)
        m = self._shards[name]
        if m.corrected is None:
            m.corrected = torch.empty_like(m.value)
        for lo in range(0, m.value.numel(), CHUNK):
            fill(lo, lo + CHUNK, m.corrected, False)
        return m.corrected

    def frozen(self, name: str, grad: torch.Tensor, denom: torch.Tensor) -> Fill:
        """`step` by ranges, for a caller that consumes its result range by range (error
        feedback as the codec reaches each chunk: worker/feedback.py's `compress_with`).
        Counts the step now; the returned fill(lo, hi, out, add) steps the momentum over
        [lo, hi) and writes its bias-corrected value into out[lo:hi], or adds it there. Call
        it once for every range of the shard, each element once."""
        m = self._of(name, grad, preconditioned=True)
        if not m.preconditioned:
            m.value.div_(denom)
            m.preconditioned = True
        m.count += 1
        scale, beta1 = 1 / (1 - self.beta1 ** m.count), self.beta1
        grad = grad.reshape(-1).to(torch.float32)

        def fill(lo: int, hi: int, out: torch.Tensor, add: bool) -> None:
            value = m.value[lo:hi].mul_(beta1).add_(grad[lo:hi] / denom[lo:hi], alpha=1 - beta1)
            if add:
                out[lo:hi].add_(value * scale)  # as adding step()'s result: the same two roundings
            else:
                torch.mul(value, scale, out=out[lo:hi])

        return fill

    def momentum(self, name: str) -> torch.Tensor | None:
        """Shard `name`'s momentum, uncorrected (None before its first step)."""
        m = self._shards.get(name)
        return None if m is None else m.value

    def saved(self) -> dict[str, _Momentum]:
        """A copy of every shard's momentum and count (WirePush's snapshot)."""
        return {name: _Momentum(m.value.clone(), m.count, m.preconditioned)
                for name, m in self._shards.items()}

    def restore(self, saved: dict[str, _Momentum]) -> None:
        """Replaces every shard's momentum with a copy of `saved` (kept intact)."""
        self._shards = {name: _Momentum(m.value.clone(), m.count, m.preconditioned)
                        for name, m in saved.items()}

    def reset(self) -> None:
        """Drops every shard's momentum (the job's weights were replaced): each starts again
        at 0, and its correction with it."""
        self._shards.clear()

    def _of(self, name: str, grad: torch.Tensor, preconditioned: bool) -> _Momentum:
        m = self._shards.get(name)
        if (m is None or m.value.numel() != grad.numel()  # new, or the shard was remapped
                or (m.preconditioned and not preconditioned)):  # a warm-up step replayed
            m = _Momentum(torch.zeros(grad.numel()), 0, preconditioned)
            self._shards[name] = m
        return m

    def _add(self, m: _Momentum, u: torch.Tensor) -> None:
        m.value.mul_(self.beta1).add_(u.reshape(-1).to(torch.float32), alpha=1 - self.beta1)
        m.count += 1
