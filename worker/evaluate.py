"""Evaluation on a dataset's held-out split, with the same loss the training loop uses."""

from __future__ import annotations

import math

import torch
from torch import nn

from shardps.worker import tasks
from shardps.worker.datasets import Dataset


def evaluate(model: nn.Module, dataset: Dataset, device: str | torch.device = "cpu",
             batch_size: int = 512) -> dict[str, float]:
    """Returns the task's metrics on the test split, primary metric first, "loss" included.

    classification: accuracy, loss. regression: mse, loss. language_model: perplexity
    (exp of the per-token loss), accuracy (per token), loss. Runs under no_grad in eval mode
    and restores the module's previous mode. Threading: uses the model; call it from the
    thread that trains it.
    """
    task = dataset.task
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(dataset.test_x), batch_size):
                x = dataset.test_x[start : start + batch_size].to(device)
                y = dataset.test_y[start : start + batch_size].to(device)
                out = model(x)
                # Summed, then divided once: the mean over the whole split, not of batch means.
                total_loss += float(tasks.loss(task, out, y, reduction="sum"))
                if task == "regression":
                    count += y.numel()
                else:
                    correct += int((out.argmax(dim=-1) == y).sum())
                    count += y.numel()
    finally:
        model.train(was_training)
    mean_loss = total_loss / count
    if task == "classification":
        return {"accuracy": correct / count, "loss": mean_loss}
    if task == "regression":
        return {"mse": mean_loss, "loss": mean_loss}
    perplexity = math.exp(mean_loss) if mean_loss < 700 else math.inf  # exp overflows past ~709
    return {"perplexity": perplexity, "accuracy": correct / count, "loss": mean_loss}
