"""Frozen-variance Adam: after a warm-up of plain Adam steps, the shard stops updating Adam's
second moment and divides by its frozen value, so that an update is linear in the gradient.

Why: top-k and sign pushes with error feedback release what they held back in bursts, and
Adam, which divides each coordinate by its own running magnitude, turns a burst into a full
step (and its second moment sees bursts, not the gradient). With the denominator frozen, the
step is momentum SGD with a fixed per-coordinate scale, under which error feedback delivers
the dropped mass late but whole, as with SGD (the 1-bit Adam / 0/1 Adam scheme; docs/network.md,
"Top-k and sign under Adam", has the measurements).

The frozen denominator is floored at FLOOR times its mean over the shard: a coordinate that
saw almost no gradient in the warm-up would otherwise take a step of (scale / eps) the first
time a sign block's scale lands on it.

Nothing here is state of its own: the step counter, m and v are Adam's state tensors
({step, exp_avg, exp_avg_sq}), so checkpoints carry them and a restore resumes frozen where
it left off. The denominator is a function of v, which no longer changes, so the caller
computes it once at the freeze and passes it to every step (Updater caches it, and drops it
when a restore replaces v: computed again from the restored v, it is the same bits). Pure and
deterministic; the caller's lock guards the tensors.
"""

from __future__ import annotations

import math

import torch

from shardps.proto import common_pb2

# The frozen denominator's floor, as a fraction of its mean over the shard. Measured on
# digits (2 workers, batch 64, warm-up 10, a block per tensor): sign with EF 100-106 steps
# with no floor, 97-114 at 0.1, 53-67 at 0.5 (fp32: 63-71); top-k 10% 60-67 at each.
FLOOR = 0.5


def frozen(config: common_pb2.OptimizerConfig, state: dict) -> bool:
    """Whether the next step of a shard with this Adam state runs frozen: the config freezes
    and `freeze_variance_after` plain steps are done (so v holds what they made)."""
    after = config.freeze_variance_after
    return bool(after and state) and int(state["step"].item()) >= after


def denominator(config: common_pb2.OptimizerConfig, exp_avg_sq: torch.Tensor,
                floor: float | None = None) -> torch.Tensor:
    """sqrt of v bias-corrected at the freeze, floored at `floor` (default FLOOR) x its mean,
    plus eps."""
    correction = 1 - config.beta2 ** config.freeze_variance_after
    denom = exp_avg_sq.sqrt().div_(math.sqrt(correction))
    if denom.numel():
        denom.clamp_(min=(FLOOR if floor is None else floor) * float(denom.mean()))
    return denom.add_(config.eps)


def begin(config: common_pb2.OptimizerConfig, state: dict, denom: torch.Tensor) -> int:
    """Counts a frozen step; returns its number t. Then `apply` steps the shard block by
    block (each element once): the step is elementwise, so its gradient is never formed whole."""
    state["step"].add_(1)
    return int(state["step"].item())


def apply(config: common_pb2.OptimizerConfig, state: dict, t: int, lr: float, lo: int,
          weights: torch.Tensor, grad: torch.Tensor, denom: torch.Tensor) -> None:
    """Step t on the shard's elements [lo, lo + len(grad)) with grad (fp32, those elements,
    consumed: it may be changed): m = beta1 m + (1 - beta1) g; w -= lr m / (1 - beta1^t) /
    denom; v unchanged. weights, denom (`denominator(config, state["exp_avg_sq"])`, read only)
    and Adam's state are the whole shard's. Weight decay as Adam's: L2 added to the gradient
    (adam), or decoupled (adamw)."""
    span = slice(lo, lo + grad.numel())
    weights = weights[span]
    if config.weight_decay:
        if config.name == "adamw":
            weights.mul_(1 - lr * config.weight_decay)
        else:
            grad.add_(weights, alpha=config.weight_decay)
    exp_avg: torch.Tensor = state["exp_avg"][span]
    exp_avg.mul_(config.beta1).add_(grad, alpha=1 - config.beta1)
    weights.addcdiv_(exp_avg, denom[span], value=-lr / (1 - config.beta1 ** t))
