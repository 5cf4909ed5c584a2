"""Evaluation: metric order per task, exact values on known outputs, and the training loss."""

import math

import pytest
import torch
from torch import nn

from shardps.worker import tasks
from shardps.worker.datasets import Dataset, load_dataset
from shardps.worker.evaluate import evaluate


class FixedLogits(nn.Module):
    """Returns precomputed outputs for inputs that are row indices into them."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.outputs[x[:, 0].long()] + self.weight


def classification(n=10, classes=3):
    labels = torch.arange(n) % classes
    index = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return Dataset(index, labels, index, labels, "classification"), labels


def test_classification_accuracy_and_loss_match_hand_computation():
    data, labels = classification()
    logits = torch.empty(10, 3)
    logits[:7] = nn.functional.one_hot(labels[:7], 3) * 5.0  # first 7 right
    logits[7:] = nn.functional.one_hot((labels[7:] + 1) % 3, 3) * 5.0  # last 3 wrong
    model = FixedLogits(logits)
    model.train()
    result = evaluate(model, data, batch_size=3)  # batches of 3: 3+3+3+1
    assert list(result) == ["accuracy", "loss"]
    assert result["accuracy"] == pytest.approx(0.7)
    assert result["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)),
                                           rel=1e-6)
    assert model.training  # mode restored


def test_regression_reports_mse_first():
    x = torch.randn(9, 2)
    y = torch.randn(9)
    data = Dataset(x, y, x, y, "regression")
    model = nn.Linear(2, 1)
    result = evaluate(model, data, batch_size=4)
    assert list(result) == ["mse", "loss"]
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(x).squeeze(1), y))
    assert result["mse"] == pytest.approx(expected, rel=1e-5) == result["loss"]


def test_language_model_reports_perplexity_accuracy_loss():
    data = load_dataset("text", {"max_chars": 5000, "seq_len": 16}, seed=0)
    torch.manual_seed(0)
    from shardps.worker.models import build_model
    model = build_model("gru", {"hidden": 16, "embed": 8}, data.info)
    result = evaluate(model, data, batch_size=5)
    assert list(result) == ["perplexity", "accuracy", "loss"]
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    with torch.no_grad():
        full = tasks.loss("language_model", model(data.test_x), data.test_y)
        acc = (model(data.test_x).argmax(-1) == data.test_y).float().mean()
    assert result["loss"] == pytest.approx(float(full), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float(acc))
    # An untrained model is near uniform: perplexity close to the vocabulary size.
    assert 0.5 * data.info["vocab_size"] < result["perplexity"] < 2 * data.info["vocab_size"]


def test_primary_metric_leads():
    for task, metrics in tasks.METRICS.items():
        assert tasks.primary_metric(task) == metrics[0]
        assert metrics[-1] == "loss"


def test_binary_reports_exact_auc_and_logloss_over_batches():
    # Scores with ties across batch boundaries: AUC is computed over the whole split.
    scores = torch.tensor([0.5, -1.0, 2.0, 0.5, 0.5, -3.0, 1.0, 0.0, 0.5])
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 0, 1, 0])
    index = torch.arange(9, dtype=torch.float32).unsqueeze(1)
    data = Dataset(index, labels, index, labels, "binary")
    assert data.test_y.dtype == torch.float32
    result = evaluate(FixedLogits(scores), data, batch_size=4)
    assert list(result) == ["auc", "logloss", "loss"]
    # By hand: 4 positives x 5 negatives; count pairs where the positive scores higher (ties 1/2).
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(float((p > n) + 0.5 * (p == n)) for p in pos for n in neg)
    assert result["auc"] == pytest.approx(wins / 20, abs=1e-12)
    expected = float(nn.functional.binary_cross_entropy_with_logits(scores, labels.float()))
    assert result["logloss"] == pytest.approx(expected, rel=1e-6) == result["loss"]
    assert tasks.loss("binary", scores.unsqueeze(1), labels.float()) == pytest.approx(expected)
