"""Convergence targets on the binary metrics: auc is reached from below, logloss from above."""

from shardps.proto import common_pb2
from shardps.server.coordinator.convergence import ConvergenceTracker


def stop(metric, value):
    return {"max_steps": 0, "max_epochs": 0.0, "target": {"metric": metric, "value": value},
            "patience": 0, "min_delta": 0.0, "eval_every": 10}


def test_auc_target_converges_when_reached_from_below():
    t = ConvergenceTracker(stop("auc", 0.7))
    assert t.observe(10, "auc", 0.69) is None
    assert t.observe(10, "logloss", 0.1) is None  # another metric of the same evaluation
    verdict = t.observe(20, "auc", 0.7)
    assert verdict.state == common_pb2.JOB_STATE_CONVERGED
    assert (t.best, t.best_step) == (0.7, 20)


def test_logloss_target_converges_when_reached_from_above():
    t = ConvergenceTracker(stop("logloss", 0.45))
    assert t.observe(10, "logloss", 0.5) is None
    assert t.observe(20, "auc", 0.99) is None
    verdict = t.observe(30, "logloss", 0.449)
    assert verdict.state == common_pb2.JOB_STATE_CONVERGED
