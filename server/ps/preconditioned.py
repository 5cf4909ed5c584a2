"""Frozen-variance Adam with preconditioned pushes (optimizer.precondition_pushes): once the
variance is frozen, workers push u = g / D, D the shard's frozen denominator, which they read
once (GetPreconditioner), and the shard steps on u without dividing again.

Why: a sign push sends one scale per block, and the gradient's coordinates differ by orders of
magnitude, so the sign of g flattens them; g / D puts them on Adam's own scale first, where
they are comparable (docs/network.md, "Preconditioned pushes", has the measurements). The
step is frozen_adam's with D moved to the worker: m = beta1 m + (1 - beta1) u;
w -= lr m / (1 - beta1^t). Both are linear in what error feedback delivers.

D is floored at FLOOR x its mean (frozen_adam's floor is for plain gradients; measured here
on digits minibatches, three batch orders, sign with EF: 55, 63, 45 steps at 0.1; 63, 55, 48
at 0.5; never at 0; fp32 63, 71, 59).
With optimizer.worker_momentum the workers keep the momentum instead (worker/momentum.py)
and the shard steps w -= lr u on their mean (`apply`).
Pure and deterministic; the caller's lock guards the tensors. No state of its own: D is the
caller's (Updater computes it once at the freeze, as for frozen_adam).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shardps.proto import common_pb2

from . import frozen_adam
from .errors import ShardClosedError

if TYPE_CHECKING:
    from .core import ShardCore

FLOOR = 0.1


def denominator(config: common_pb2.OptimizerConfig, state: dict) -> torch.Tensor:
    """The frozen denominator the workers divide by (a new tensor): frozen_adam's, floored
    at FLOOR x its mean."""
    return frozen_adam.denominator(config, state["exp_avg_sq"], FLOOR)


def begin(config: common_pb2.OptimizerConfig, state: dict, denom: torch.Tensor) -> int:
    """Counts a step; returns its number t. Then `apply` steps the shard block by block, as
    frozen_adam's. At the first frozen step (without worker momentum) the warm-up's momentum,
    in the gradient's units, goes into the pushes' (m / D), where the plain step left it:
    from here on it sums pushes."""
    if not config.worker_momentum and int(state["step"].item()) == config.freeze_variance_after:
        state["exp_avg"].div_(denom)
    state["step"].add_(1)
    return int(state["step"].item())


def apply(config: common_pb2.OptimizerConfig, state: dict, t: int, lr: float, lo: int,
          weights: torch.Tensor, pushed: torch.Tensor, denom: torch.Tensor) -> None:
    """Step t on the shard's elements [lo, lo + len(pushed)) with the round's preconditioned
    push u there (fp32, consumed): m = beta1 m + (1 - beta1) u; w -= lr m / (1 - beta1^t).
    With optimizer.worker_momentum u is the mean of the workers' bias-corrected momenta and
    the step is w -= lr u: the shard keeps no momentum of its own (Adam's m stays as the
    warm-up left it, in checkpoints, unused). weights, denom (`denominator(config, state)`,
    read only) and Adam's state are the whole shard's. Weight decay as Adam's: decoupled
    (adamw), or L2 added as weight_decay * w / D (adam), which is the L2 term preconditioned
    as the worker preconditions the gradient (outside the workers' momentum)."""
    span = slice(lo, lo + pushed.numel())
    weights = weights[span]
    if config.weight_decay:
        if config.name == "adamw":
            weights.mul_(1 - lr * config.weight_decay)
        else:
            pushed.addcdiv_(weights, denom[span], value=config.weight_decay)
    if config.worker_momentum:
        weights.add_(pushed, alpha=-lr)
        return
    exp_avg: torch.Tensor = state["exp_avg"][span]
    exp_avg.mul_(config.beta1).add_(pushed, alpha=1 - config.beta1)
    weights.add_(exp_avg, alpha=-lr / (1 - config.beta1 ** t))


def of_core(core: ShardCore) -> torch.Tensor:
    """A copy of a shard's frozen denominator, under its lock (Updater.preconditioner; raises
    InvalidConfigError while there is none, ShardClosedError once the shard is dropped)."""
    with core.cond:
        if core.closed:
            raise ShardClosedError("shard was dropped or replaced")
        return core.updater.preconditioner()
