"""Evaluation on a dataset's held-out split, with the same loss the training loop uses."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from shardps.worker import binmetrics, tasks


class EvalData(Protocol):
    """What evaluation needs of a dataset: its task and its test split in batches."""

    @property
    def task(self) -> str: ...

    def test_batches(self, batch_size: int) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]: ...


def evaluate(model: nn.Module, dataset: EvalData, device: str | torch.device = "cpu",
             batch_size: int = 512) -> dict[str, float]:
    """Returns the task's metrics on the test split, primary metric first, "loss" included.

    classification: accuracy, loss. regression: mse, loss. language_model: perplexity
    (exp of the per-token loss), accuracy (per token), loss. binary: auc (exact, over the
    whole split), logloss (== loss, the mean binary cross-entropy). Runs under no_grad in
    eval mode and restores the module's previous mode. Threading: uses the model; call it
    from the thread that trains it.
    """
    task = dataset.task
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for inputs, target in dataset.test_batches(batch_size):
                y = target.to(device)
                out = model(*(x.to(device) for x in inputs))
                # Summed, then divided once: the mean over the whole split, not of batch means.
                total_loss += float(tasks.loss(task, out, y, reduction="sum"))
                count += y.numel()
                if task == "binary":  # AUC ranks the whole split: keep one score per sample
                    logits.append(out.reshape(y.shape).cpu())
                    labels.append(target)
                elif task != "regression":
                    correct += int((out.argmax(dim=-1) == y).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the test split is empty")
    mean_loss = total_loss / count
    if task == "classification":
        return {"accuracy": correct / count, "loss": mean_loss}
    if task == "regression":
        return {"mse": mean_loss, "loss": mean_loss}
    if task == "binary":
        return {"auc": binmetrics.auc(torch.cat(logits), torch.cat(labels)), "logloss": mean_loss,
                "loss": mean_loss}
    perplexity = math.exp(mean_loss) if mean_loss < 700 else math.inf  # exp overflows past ~709
    return {"perplexity": perplexity, "accuracy": correct / count, "loss": mean_loss}
