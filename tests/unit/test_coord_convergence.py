"""Convergence verdicts: targets in both directions, patience, min_delta, divergence."""

import math

import pytest

from shardps.proto import common_pb2
from shardps.server.coordinator.convergence import ConvergenceTracker, non_finite_loss


def stop(metric=None, value=None, patience=0, min_delta=0.0):
    target = {"metric": metric, "value": value} if value is not None else None
    return {"max_steps": 0, "max_epochs": 0.0, "target": target, "patience": patience,
            "min_delta": min_delta, "eval_every": 10}


def test_accuracy_target_converges_when_reached_from_below():
    t = ConvergenceTracker(stop("accuracy", 0.9))
    assert t.observe(10, "accuracy", 0.5) is None
    assert t.observe(20, "accuracy", 0.89) is None
    verdict = t.observe(30, "accuracy", 0.9)
    assert verdict.state == common_pb2.JOB_STATE_CONVERGED
    assert "accuracy 0.9 reached target 0.9 at step 30" == verdict.reason
    assert (t.best, t.best_step, t.latest) == (0.9, 30, 0.9)


def test_loss_target_converges_when_reached_from_above():
    t = ConvergenceTracker(stop("loss", 0.1))
    assert t.observe(10, "loss", 0.5) is None
    assert t.observe(20, "loss", 0.11) is None
    assert t.observe(30, "loss", 0.09).state == common_pb2.JOB_STATE_CONVERGED
    assert t.best == 0.09


def test_patience_completes_after_n_evaluations_without_improvement():
    t = ConvergenceTracker(stop("accuracy", 0.99, patience=2))
    assert t.observe(10, "accuracy", 0.5) is None
    assert t.observe(20, "accuracy", 0.6) is None  # improvement: patience restarts
    assert t.observe(30, "accuracy", 0.55) is None
    verdict = t.observe(40, "accuracy", 0.6)  # equal is not better
    assert verdict.state == common_pb2.JOB_STATE_COMPLETED
    assert verdict.reason == "no improvement of more than 0 in 2 evaluations"
    assert (t.best, t.best_step) == (0.6, 20)


def test_gains_within_min_delta_do_not_reset_patience_but_count_as_best():
    t = ConvergenceTracker(stop("loss", 0.0, patience=2, min_delta=0.1))
    assert t.observe(1, "loss", 1.0) is None
    assert t.observe(2, "loss", 0.95) is None
    verdict = t.observe(3, "loss", 0.91)
    assert verdict.reason == "no improvement of more than 0.1 in 2 evaluations"
    assert (t.best, t.best_step) == (0.91, 3)


def test_patience_zero_never_stops():
    t = ConvergenceTracker(stop("accuracy", 0.99))
    assert all(t.observe(s, "accuracy", 0.5) is None for s in range(100))


def test_without_target_the_first_metric_seen_is_followed():
    t = ConvergenceTracker(stop(patience=1))
    assert t.metric == ""
    assert t.observe(1, "mse", 2.0) is None
    assert t.observe(2, "accuracy", 0.1) is None  # another metric: ignored
    assert t.metric == "mse" and t.latest == 2.0
    assert t.observe(3, "mse", 2.5).state == common_pb2.JOB_STATE_COMPLETED


def test_non_finite_evaluation_fails_and_unknown_metric_raises():
    t = ConvergenceTracker(stop("accuracy", 0.9))
    with pytest.raises(ValueError, match="unknown metric"):
        t.observe(1, "f1", 0.5)
    verdict = t.observe(2, "accuracy", math.nan)
    assert verdict.state == common_pb2.JOB_STATE_FAILED
    assert "non-finite" in verdict.reason and "step 2" in verdict.reason
    assert not t.has_eval


def test_non_finite_loss_reason():
    assert non_finite_loss(3, 0.5, "worker-a") is None
    assert non_finite_loss(7, math.nan, "worker-a") == (
        "loss became non-finite (nan) at step 7 on worker worker-a")
    assert "(inf)" in non_finite_loss(7, math.inf, "worker-a")
