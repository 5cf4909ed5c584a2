"""Fused Adam / AdamW over one flat fp32 tensor, steppable block by block, without torch.optim.

It runs torch's own fused CPU kernel (`torch._fused_adam_` / `torch._fused_adamw_`, which is what
`torch.optim.Adam(fused=True)` calls) with the same state and step counting, so its results are
bitwise those of torch.optim (tests/unit/test_ps_adam.py). Two reasons not to use torch.optim
itself on a server: the first call into any torch.optim.Optimizer imports torch._dynamo (about
2 s of CPU and 70 MB of resident memory per server process here), and it can only step a
whole tensor, while a gradient held in a wire dtype (bf16/fp16) must be cast to fp32 block by
block to avoid a second full-size buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

# Elements per block when a gradient is cast or averaged before the kernel: 4 MiB of fp32, in
# the L3 here; a quarter of that spends more on per-call overhead than it saves (measured on
# 100M: 117 ms for a 2-worker mean + Adam at 1M, 127 ms at 256K, 138 ms at 4M, 119 ms whole).
# A multiple of every vector width, so each element takes the same kernel path as in a
# whole-tensor step (which keeps results bitwise equal).
BLOCK_ELEMENTS = 1024 * 1024


@functools.cache
def available() -> bool:
    """Whether this torch has the fused Adam kernels for CPU tensors (torch >= 2.4)."""
    try:
        one = [torch.zeros(1)]
        torch._fused_adam_(one, [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], [],
                           [torch.ones(())], amsgrad=False, lr=0.1, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, maximize=False)
    except (AttributeError, RuntimeError, TypeError):
        return False
    return True


class FusedAdam:
    """Adam (AdamW with `decoupled`) state of one flat fp32 parameter, with torch.optim's surface
    where the shard and its checkpoints use it: `param_groups[0]` (set "lr" there), `state[param]`
    ({step, exp_avg, exp_avg_sq}, created by the first step, replaceable), `state_dict()` and
    `step()` (which reads `param.grad`). `begin()` + `apply()` step it in blocks instead.

    Not thread-safe: its owner's lock guards it.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, decoupled: bool = False):
        (param,) = params
        if param.dtype != torch.float32 or param.device.type != "cpu" or param.dim() != 1:
            raise ValueError("FusedAdam steps one flat fp32 CPU tensor")
        self.param = param
        self.param_groups: list[dict[str, Any]] = [{
            "params": [param], "lr": lr, "betas": tuple(betas), "eps": eps,
            "weight_decay": weight_decay, "amsgrad": False, "maximize": False, "foreach": None,
            "capturable": False, "differentiable": False, "fused": True,
            "decoupled_weight_decay": decoupled,
        }]
        self.state: dict[torch.Tensor, Any] = {}  # param -> {step, exp_avg, exp_avg_sq}
        self._kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_

    def begin(self) -> dict[str, Any]:
        """Starts one step: creates the state at the first one, counts the step (as torch.optim
        does before its kernel); every block of the step is then `apply`d once."""
        state = self.state.get(self.param)
        if not state:
            state = self.state[self.param] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(self.param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(self.param, memory_format=torch.preserve_format),
            }
        state["step"].add_(1)
        return state

    def apply(self, state: dict[str, Any], start: int, grad: torch.Tensor) -> None:
        """The kernel on elements [start, start + grad.numel()) with an fp32 gradient block."""
        end = start + grad.numel()
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        self._kernel([self.param[start:end]], [grad], [state["exp_avg"][start:end]],
                     [state["exp_avg_sq"][start:end]], [], [state["step"]], amsgrad=False,
                     lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def step(self) -> None:
        """One step over the whole parameter with `param.grad` (fp32)."""
        grad = self.param.grad
        if grad is None:
            return
        self.apply(self.begin(), 0, grad)

    def state_dict(self) -> dict:
        """torch.optim's layout: {"state": {0: {...}}, "param_groups": [{..., "params": [0]}]}."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        state = self.state.get(self.param)
        return {"state": {0: dict(state)} if state else {}, "param_groups": [{**group, "params": [0]}]}
