"""Row-wise optimizers of embedding tables, and the sync combination of workers' row gradients.

An optimizer updates the rows at given slots of a table's weight tensor with one coalesced
gradient (unique slots), and keeps its per-row state in tensors the table allocates beside
the weights (`state_shapes`), slot-aligned, so rows move and are evicted with their state.
Scalar state (the step count) is the optimizer's.

- LazyAdam: torch.optim.SparseAdam, bitwise (tests/unit/test_tables_optim.py): moments of the
  touched rows only, bias correction by the table's step count (every step the table had a
  gradient, even one with no row on this server).
- RowwiseAdagrad: FBGEMM's / TorchRec's EXACT_ROWWISE_ADAGRAD: one accumulator per row, which
  adds the mean over the row of the squared gradient; row -= lr * g / (sqrt(acc) + eps).

Not thread-safe: the owning table's lock guards it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class RowOptimizer(ABC):
    """Base: `step` counts a step and updates the given rows."""

    name = ""

    def __init__(self, lr: float):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = lr
        self.steps = 0

    @abstractmethod
    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """Per-row state: name -> shape of one row's state (fp32)."""

    def initial_state(self) -> dict[str, float]:
        """The value a new row's state starts at, per state name (absent: 0)."""
        return {}

    def state_bytes_per_row(self, dim: int) -> int:
        return 4 * sum(math.prod(shape) for shape in self.state_shapes(dim).values())

    def step(self, weights: torch.Tensor, state: dict[str, torch.Tensor], slots: torch.Tensor,
             grads: torch.Tensor, lr: float | None = None) -> None:
        """One step: `steps` += 1, then rows `slots` (unique) of `weights` and `state` take the
        coalesced gradient `grads` [len(slots), dim]. `lr` overrides the base rate (a schedule)."""
        self.steps += 1
        if slots.numel():
            self._update(weights, state, slots, grads, self.lr if lr is None else lr)

    @abstractmethod
    def _update(self, weights: torch.Tensor, state: dict[str, torch.Tensor], slots: torch.Tensor,
                grads: torch.Tensor, lr: float) -> None:
        """Updates rows `slots` of `weights` and `state` with `grads` at rate `lr`."""

    def hyper(self) -> dict:
        """Hyper-parameters and scalar state, for checkpoints."""
        return {"name": self.name, "lr": self.lr, "steps": self.steps}


class LazyAdam(RowOptimizer):
    """torch.optim.SparseAdam on the rows of one table, op for op (so bitwise)."""

    name = "sparse_adam"

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False):
        super().__init__(lr)
        if not 0.0 < eps:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.maximize = maximize

    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (dim,), "exp_avg_sq": (dim,)}

    def _update(self, weights, state, slots, grads, lr):
        # torch/optim/_functional.py, sparse_adam, with dense rows in place of sparse tensors:
        # `dense.add_(sparse(v))` on coalesced indices is `rows + v`, one rounding either way.
        beta1, beta2 = self.betas
        grad = -grads if self.maximize else grads
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        old_exp_avg = exp_avg.index_select(0, slots)
        exp_avg_update = grad.sub(old_exp_avg).mul_(1 - beta1)
        exp_avg.index_copy_(0, slots, old_exp_avg + exp_avg_update)
        old_exp_avg_sq = exp_avg_sq.index_select(0, slots)
        exp_avg_sq_update = grad.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)
        exp_avg_sq.index_copy_(0, slots, old_exp_avg_sq + exp_avg_sq_update)
        numer = exp_avg_update.add_(old_exp_avg)
        exp_avg_sq_update.add_(old_exp_avg_sq)
        denom = exp_avg_sq_update.sqrt_().add_(self.eps)
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2 = 1 - beta2 ** self.steps
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        rows = weights.index_select(0, slots)
        weights.index_copy_(0, slots, rows + (-step_size * numer.div_(denom)))

    def hyper(self) -> dict:
        return {**super().hyper(), "betas": list(self.betas), "eps": self.eps,
                "maximize": self.maximize}


class RowwiseAdagrad(RowOptimizer):
    """Row-wise Adagrad: per row, acc += mean(g * g); row -= lr * g / (sqrt(acc) + eps).

    `weight_decay` adds weight_decay * row to the gradient first (FBGEMM's L2 mode).
    `initial_accumulator_value` is where a new row's accumulator starts.
    """

    name = "rowwise_adagrad"

    def __init__(self, lr: float = 0.01, eps: float = 1e-8, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0):
        super().__init__(lr)
        if not 0.0 < eps:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0 or initial_accumulator_value < 0:
            raise ValueError("weight_decay and initial_accumulator_value must be >= 0")
        self.eps = eps
        self.weight_decay = weight_decay
        self.initial_accumulator_value = initial_accumulator_value

    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        return {"sum": ()}

    def initial_state(self) -> dict[str, float]:
        return {"sum": self.initial_accumulator_value}

    def _update(self, weights, state, slots, grads, lr):
        rows = weights.index_select(0, slots)
        grad = grads + self.weight_decay * rows if self.weight_decay else grads
        acc = state["sum"].index_select(0, slots) + grad.pow(2).mean(1)
        state["sum"].index_copy_(0, slots, acc)
        scale = lr / (acc.sqrt() + self.eps)
        weights.index_copy_(0, slots, rows - scale[:, None] * grad)

    def hyper(self) -> dict:
        return {**super().hyper(), "eps": self.eps, "weight_decay": self.weight_decay,
                "initial_accumulator_value": self.initial_accumulator_value}


def make_optimizer(hyper: dict) -> RowOptimizer:
    """An optimizer from `hyper()`'s dict (checkpoint restore), steps included."""
    args = {k: v for k, v in hyper.items() if k not in ("name", "steps")}
    opt: RowOptimizer
    if hyper["name"] == LazyAdam.name:
        opt = LazyAdam(lr=args["lr"], betas=tuple(args["betas"]), eps=args["eps"],
                       maximize=args["maximize"])
    elif hyper["name"] == RowwiseAdagrad.name:
        opt = RowwiseAdagrad(**args)
    else:
        raise ValueError(f"unknown row optimizer {hyper['name']!r}")
    opt.steps = int(hyper["steps"])
    return opt


@dataclass
class RowGrads:
    """One worker's coalesced gradient for one table: strictly increasing ids, rows [n, dim],
    and the number of samples it was computed on (the weight of a sync round)."""

    ids: torch.Tensor
    grads: torch.Tensor
    batch_size: int = 1


def combine(parts: Sequence[RowGrads]) -> tuple[torch.Tensor, torch.Tensor]:
    """A sync round's gradient for one table: the union of the workers' ids, each row the
    batch-size-weighted sum of the workers' rows for it (a worker without that id adds 0),
    weighted as the dense shards weight whole gradients (server/ps/shard.py, _close_round):
    workers with no samples are left out unless nobody had samples (then a plain mean), and
    a lone contribution is used as is, so one worker matches torch bitwise.

    Parts come in rank order; the sums run in that order.
    """
    if not parts:
        raise ValueError("combine needs at least one part")
    weighted = [p for p in parts if p.batch_size > 0] or list(parts)
    if len(weighted) == 1:
        return weighted[0].ids, weighted[0].grads
    total = sum(p.batch_size for p in weighted)
    shares = [p.batch_size / total if total else 1 / len(weighted) for p in weighted]
    ids = torch.unique(torch.cat([p.ids for p in weighted]))  # sorted
    dim = weighted[0].grads.shape[1]
    out = torch.zeros((ids.numel(), dim), dtype=torch.float32)
    for part, share in zip(weighted, shares, strict=True):
        out.index_add_(0, torch.searchsorted(ids, part.ids), part.grads, alpha=share)
    return ids, out
