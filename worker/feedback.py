"""Error feedback for compressed pushes: what compression dropped this step is added back
to the gradient next step, so nothing is lost, only delayed.

For each tensor: corrected = grad + residual; wire = encode(corrected);
residual = corrected - decode(wire). Summed over steps, what the servers receive equals the
sum of the true gradients minus the final residual (tests/unit/test_feedback.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardps.proto.compress import CHUNK, Compressor


class ErrorFeedback:
    """One worker's residuals, one per named tensor, for one compressor.

    Not thread-safe: owned by the thread that pushes. `enabled=False` compresses without
    carrying the residual (for contrast in tests and benches).
    """

    def __init__(self, compressor: Compressor, enabled: bool = True):
        self.compressor = compressor
        self.enabled = enabled
        self._residuals: dict[str, torch.Tensor] = {}

    def compress(self, name: str, grad: torch.Tensor) -> bytes:
        """The wire form of grad (1-D fp32) plus the residual carried from the last step."""
        flat = grad.detach().reshape(-1).to(torch.float32)
        residual = self._residuals.get(name)
        if residual is not None and residual.numel() != flat.numel():
            raise ValueError(f"tensor {name!r} has {flat.numel()} elements, its residual {residual.numel()}")
        if not self.enabled:
            return self.compressor.encode(flat)
        # residual + grad, in the residual's own memory (addition commutes bitwise), which
        # encode_feedback then leaves holding corrected - decode(wire): the next residual.
        corrected = residual.add_(flat) if residual is not None else flat.clone(memory_format=torch.contiguous_format)
        data = self.compressor.encode_feedback(corrected)
        self._residuals[name] = corrected
        return data

    def compress_with(self, name: str, numel: int,
                      fill: Callable[[int, int, torch.Tensor, bool], None]) -> bytes:
        """`compress(name, g)` for a g of numel elements that fill(lo, hi, out, add) writes into
        out[lo:hi] (or adds there) range by range, called as the codec reaches each chunk: the
        residual, the sum and the encoding in one pass over memory instead of three
        (WorkerMomentum.frozen). The same bits as compress(name, g)."""
        residual = self._residuals.get(name)
        if residual is not None and residual.numel() != numel:
            raise ValueError(f"tensor {name!r} has {numel} elements, its residual {residual.numel()}")
        add = residual is not None and self.enabled
        corrected = residual if residual is not None and add else torch.empty(numel)

        def prepare(lo: int, hi: int) -> None:
            fill(lo, hi, corrected, add)

        if not self.enabled:
            return self.compressor.encode(_filled(corrected, prepare))
        data = self.compressor.encode_feedback(corrected, fill=prepare)
        self._residuals[name] = corrected
        return data

    def residual(self, name: str) -> torch.Tensor | None:
        """What is still owed on tensor `name` (None before its first step or with EF off)."""
        return self._residuals.get(name)

    def reset(self) -> None:
        """Drops every residual (a new job, or weights replaced by a checkpoint)."""
        self._residuals.clear()

    def saved(self) -> dict[str, torch.Tensor]:
        """A copy of every residual (WirePush's snapshot at a checkpoint version)."""
        return {name: r.clone() for name, r in self._residuals.items()}

    def restore(self, residuals: dict[str, torch.Tensor]) -> None:
        """Replaces every residual with a copy of `residuals` (a `saved()`, kept intact)."""
        self._residuals = {name: r.clone() for name, r in residuals.items()}


def _filled(out: torch.Tensor, prepare: Callable[[int, int], None]) -> torch.Tensor:
    for lo in range(0, out.numel(), CHUNK):
        prepare(lo, min(out.numel(), lo + CHUNK))
    return out
