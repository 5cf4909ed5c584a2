"""Binary classification metrics on torch tensors: exact AUC (ranks with ties) and log loss.

Pure functions, no state: a worker evaluates them on its predictions for a test set. The
coordinator needs only the names and directions ("auc" higher is better, "logloss" lower is
better), which the job spec declares.
"""

from __future__ import annotations

import torch


def _check(scores: torch.Tensor, labels: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float64 scores and bool labels, or ValueError naming what is wrong."""
    if scores.dim() != 1 or labels.dim() != 1:
        raise ValueError(f"{name} and labels must be 1-D, got shapes {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    if scores.numel() != labels.numel():
        raise ValueError(f"{name} has {scores.numel()} values but labels has {labels.numel()}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty")
    s = scores.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} has a value that is not finite")
    y = labels.detach()
    if y.dtype != torch.bool:
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("labels must be 0 or 1")
        y = y != 0
    return s, y


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a random positive outranks a random negative.

    Exact, with ties counted as one half (the Mann-Whitney U statistic over the positives'
    average ranks), O(n log n). Raises ValueError if the labels are all of one class, where
    AUC is undefined.
    """
    s, y = _check(scores, labels, "scores")
    positives = int(y.sum())
    negatives = y.numel() - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"AUC needs both classes, got {positives} positives and {negatives} negatives")
    sorted_scores, order = torch.sort(s, stable=True)
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    # Tied scores share the average of the 1-based ranks they span.
    ends = torch.cumsum(counts, 0).to(torch.float64)
    average_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.repeat_interleave(average_rank, counts)
    positive_rank_sum = float(ranks[y[order]].sum())
    u = positive_rank_sum - positives * (positives + 1) / 2
    return u / (positives * negatives)


def log_loss(probabilities: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of predicted click probabilities, clamped to [eps, 1 - eps]."""
    p, y = _check(probabilities, labels, "probabilities")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("probabilities must lie in [0, 1]")
    p = p.clamp(eps, 1 - eps)
    return float(-torch.where(y, p.log(), (1 - p).log()).mean())


def log_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of logits (numerically stable for large |logit|)."""
    z, y = _check(logits, labels, "logits")
    return float(torch.nn.functional.binary_cross_entropy_with_logits(z, y.to(torch.float64)))
