"""The Adam step of one shard: torch's fused kernel (adam.FusedAdam) over the fp32 weights,
fed whole or block by block; torch.optim where this torch has no fused CPU kernel; and, once
the config's `freeze_variance_after` steps are done, frozen-variance Adam (frozen_adam.py).

Thread-safety: none of its own; the shard's lock guards every call. Ownership: it owns the
weights tensor and Adam's state; gradients passed to `step` stay the caller's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from shardps.proto import common_pb2

from . import adam as adam_lib
from . import frozen_adam, preconditioned
from .errors import InvalidConfigError

# One step's gradient: sum(grad * weight) over the terms in order, or the one grad as is when
# its weight is None.
Terms = list[tuple[torch.Tensor, float | None]]
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


@functools.cache
def fused_adam_available() -> bool:
    """Whether this torch has fused Adam for CPU tensors (torch >= 2.4); shards then run it
    through adam.FusedAdam (same kernel and results as `torch.optim.Adam(fused=True)`)."""
    return adam_lib.available()


class Updater:
    """Adam (or AdamW) over one flat fp32 weights tensor, taken over, not copied."""

    def __init__(self, opt: common_pb2.OptimizerConfig, weights: torch.Tensor):
        self.weights = weights.contiguous()
        self._config = opt
        self.fused = fused_adam_available()
        self._optimizer: adam_lib.FusedAdam | torch.optim.Optimizer
        if self.fused:  # torch's fused kernel without torch.optim (see adam.py for why)
            self._optimizer = adam_lib.FusedAdam(
                [self.weights], lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                weight_decay=opt.weight_decay, decoupled=opt.name == "adamw")
        else:
            adam = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
            self._optimizer = adam([self.weights], lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                   eps=opt.eps, weight_decay=opt.weight_decay)
        self._group = self._optimizer.param_groups[0]
        self._block: torch.Tensor | None = None  # fp32 scratch of a blockwise step
        # The frozen denominator, computed at the first frozen step or preconditioner read
        # (v no longer changes after it); None before, and again after `load` replaces v.
        self._denom: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.weights.numel()

    def step(self, terms: Terms, lr: float) -> None:
        """One Adam step at learning rate `lr` on the gradient the terms form.

        A single fp32 gradient is stepped in one kernel call. Any other (a round's mean, a
        gradient kept in its wire dtype) is formed block by block in a small fp32 scratch,
        each block stepped while in cache: no full-size temporary, and per element the same
        arithmetic as whole-vector ops (bitwise: test_ps_adam.py). A frozen step is always
        taken block by block (test_frozen_adam.py): on 50M elements a whole gradient formed
        first took 0.2 s a round, most of it the first writes to a fresh 200 MB tensor.
        """
        self._group["lr"] = lr
        state = self._optimizer.state.get(self.weights)
        if state is not None and frozen_adam.frozen(self._config, state):
            frozen = preconditioned if self._config.precondition_pushes else frozen_adam
            denom = self._denominator(state)
            t = frozen.begin(self._config, state, denom)
            for lo, block in self._blocks(terms):
                frozen.apply(self._config, state, t, lr, lo, self.weights, block, denom)
            return
        first, weight = terms[0]
        if isinstance(self._optimizer, adam_lib.FusedAdam) and (
                len(terms) > 1 or weight is not None or first.dtype != torch.float32):
            self._step_blocks(self._optimizer, terms)
            return
        # One fp32 gradient, or torch.optim without fused kernels: whole-vector ops.
        grad = first if first.dtype == torch.float32 else first.float()
        if weight is not None:
            grad.mul_(weight)
        for other, w in terms[1:]:
            grad.add_(other, alpha=w)
        self.weights.grad = grad
        try:
            self._optimizer.step()
        finally:
            self.weights.grad = None

    def _step_blocks(self, optimizer: adam_lib.FusedAdam, terms: Terms) -> None:
        state = optimizer.begin()
        for lo, block in self._blocks(terms):
            optimizer.apply(state, lo, block)

    def _blocks(self, terms: Terms) -> Iterator[tuple[int, torch.Tensor]]:
        """The gradient the terms form, as (offset, fp32 block) in order, each block formed
        in one scratch (valid until the next): per element the arithmetic of whole-vector
        ops (the first term cast to fp32 and weighted, then each other added)."""
        if self._block is None:
            self._block = torch.empty(min(self.length, adam_lib.BLOCK_ELEMENTS))
        (first, weight), rest = terms[0], terms[1:]
        for lo in range(0, self.length, adam_lib.BLOCK_ELEMENTS):
            hi = min(lo + adam_lib.BLOCK_ELEMENTS, self.length)
            block = self._block[: hi - lo].copy_(first[lo:hi])
            if weight is not None:
                block.mul_(weight)
            for grad, w in rest:
                block.add_(grad[lo:hi], alpha=w)
            yield lo, block

    def preconditioner(self) -> torch.Tensor:
        """The frozen denominator pushes are divided by (optimizer.precondition_pushes);
        raises InvalidConfigError unless the config preconditions and the shard is frozen."""
        state = self._optimizer.state.get(self.weights)
        if not self._config.precondition_pushes:
            raise InvalidConfigError("the job does not set optimizer.precondition_pushes")
        if state is None or not frozen_adam.frozen(self._config, state):
            raise InvalidConfigError(f"the shard is not frozen yet (freezes after "
                                     f"{self._config.freeze_variance_after} steps)")
        return self._denominator(state).clone()

    def _denominator(self, state: dict) -> torch.Tensor:
        """The frozen denominator of a frozen shard (preconditioned's or frozen_adam's floor),
        computed once: a sqrt and a mean over the shard that every frozen step would repeat."""
        if self._denom is None:
            self._denom = (preconditioned.denominator(self._config, state)
                           if self._config.precondition_pushes else
                           frozen_adam.denominator(self._config, state["exp_avg_sq"]))
        return self._denom

    def copy_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the weights ("weights") and Adam's state tensors (once a step made them)."""
        tensors = {"weights": self.weights.clone()}
        for key, value in self._optimizer.state.get(self.weights, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value.clone()
        return tensors

    def check(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raises InvalidConfigError unless a checkpoint's weights fit these."""
        weights = tensors["weights"]
        if weights.dtype != torch.float32 or weights.numel() != self.length:
            raise InvalidConfigError(f"checkpoint holds {weights.dtype}[{weights.numel()}], "
                                     f"shard is fp32[{self.length}]")

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Takes a checkpoint's weights and Adam state (none there: Adam starts afresh);
        `check` them first."""
        self.weights.copy_(tensors["weights"])
        self._denom = None  # of the v being replaced
        adam = {k: tensors[k].clone() for k in ADAM_STATE if k in tensors}
        if adam:
            self._optimizer.state[self.weights] = adam
        else:
            self._optimizer.state.pop(self.weights, None)

    def resident_bytes(self) -> int:
        """Bytes of fp32 weights plus Adam's m and v (once the first step created them) and
        the frozen denominator (once frozen)."""
        state = self._optimizer.state.get(self.weights, {})
        extra = sum(t.numel() * t.element_size() for k, t in state.items()
                    if k in ("exp_avg", "exp_avg_sq"))
        if self._denom is not None:
            extra += self._denom.numel() * self._denom.element_size()
        return self.length * 4 + extra

