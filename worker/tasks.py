"""What a dataset's task means for training: its loss, its metrics and which metric leads.

Training and evaluation both take their loss from here, so the evaluated loss is the trained one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Metric names per task, primary metric first; every name is a key of spec.METRICS.
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "loss"),  # cross-entropy over classes
    "regression": ("mse", "loss"),  # mean squared error (mse == loss)
    "language_model": ("perplexity", "accuracy", "loss"),  # next-token cross-entropy
    "binary": ("auc", "logloss", "loss"),  # one logit per sample, target 0/1 (a click)
}
TASKS = tuple(METRICS)


def primary_metric(task: str) -> str:
    """The metric a task reports first (what `shardps status` shows by default)."""
    return METRICS[check_task(task)][0]


def check_task(task: str) -> str:
    """Returns task, or raises ValueError naming the known tasks."""
    if task not in METRICS:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    return task


def loss(task: str, output: torch.Tensor, target: torch.Tensor,
         reduction: str = "mean") -> torch.Tensor:
    """The training loss of a model output against its targets.

    classification: output (N, C) logits, target (N,) class ids.
    language_model: output (N, L, V) logits, target (N, L) token ids; averaged over tokens.
    regression: output of target's number of elements (e.g. (N, 1) for target (N,)).
    binary: logits of target's number of elements, target (N,) float 0/1; binary cross-entropy.
    """
    if task == "binary":
        return F.binary_cross_entropy_with_logits(output.reshape(target.shape), target,
                                                  reduction=reduction)
    if task == "regression":
        return F.mse_loss(output.reshape(target.shape), target, reduction=reduction)
    if task == "language_model":
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1),
                               reduction=reduction)
    if task == "classification":
        return F.cross_entropy(output, target, reduction=reduction)
    raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
