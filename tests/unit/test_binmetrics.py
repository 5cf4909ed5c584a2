"""AUC and log loss against brute-force references."""

import math

import pytest
import torch

from shardps.worker.binmetrics import auc, log_loss, log_loss_from_logits


def pairwise_auc(scores: list[float], labels: list[int]) -> float:
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("distinct", [3, 20, 10_000])  # few distinct values: many ties
def test_auc_matches_the_pairwise_count(seed, distinct):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 300, (1,), generator=g))
    scores = torch.randint(0, distinct, (n,), generator=g).float() / distinct
    labels = torch.randint(0, 2, (n,), generator=g)
    labels[0], labels[1] = 0, 1  # both classes present
    assert auc(scores, labels) == pytest.approx(pairwise_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_auc_extremes_and_invariance():
    labels = torch.tensor([0, 0, 1, 1])
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    scores = torch.randn(500, generator=torch.Generator().manual_seed(1))
    y = (torch.rand(500, generator=torch.Generator().manual_seed(2)) < 0.3).long()
    # Rank-based: a monotone transform of the scores changes nothing, bool labels work too.
    assert auc(scores, y) == pytest.approx(auc(torch.sigmoid(3 * scores), y.bool()), abs=1e-12)


@pytest.mark.parametrize("scores, labels, match", [
    (torch.tensor([0.1, 0.2]), torch.tensor([1, 1]), "both classes"),
    (torch.tensor([0.1, 0.2]), torch.tensor([0, 2]), "0 or 1"),
    (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), "not finite"),
    (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1]), "3 values"),
    (torch.zeros(2, 2), torch.zeros(2, 2), "1-D"),
    (torch.zeros(0), torch.zeros(0), "empty"),
])
def test_auc_rejects_bad_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        auc(scores, labels)


def test_log_loss_matches_the_definition():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, generator=g) * 4
    labels = torch.randint(0, 2, (200,), generator=g)
    p = torch.sigmoid(logits.double())
    expected = -sum(math.log(q) if y else math.log(1 - q) for q, y in zip(p.tolist(), labels.tolist(), strict=True))
    expected /= 200
    assert log_loss(p, labels) == pytest.approx(expected, rel=1e-9)
    assert log_loss_from_logits(logits, labels) == pytest.approx(expected, rel=1e-6)


def test_log_loss_clamps_certain_mistakes_and_rejects_non_probabilities():
    assert log_loss(torch.tensor([0.0, 1.0]), torch.tensor([1, 0])) == pytest.approx(-math.log(1e-7))
    assert log_loss_from_logits(torch.tensor([-1000.0]), torch.tensor([1])) == pytest.approx(1000.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss(torch.tensor([1.5]), torch.tensor([1]))
