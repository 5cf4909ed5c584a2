"""Convergence verdicts: when evaluations say a job has converged, plateaued or diverged."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardps.proto import common_pb2
from shardps.proto.spec import METRICS, StopSpec, metric_improves


@dataclass(frozen=True)
class Verdict:
    """A job's end: a final common_pb2.JobState and the reason shown to users."""

    state: common_pb2.JobState
    reason: str


def non_finite_loss(step: int, loss: float, worker: str) -> str | None:
    """The FAILED reason if a training loss is nan or inf, else None."""
    if math.isfinite(loss):
        return None
    return f"loss became non-finite ({loss}) at step {step} on worker {worker}"


class ConvergenceTracker:
    """Follows one job's evaluations of its stop metric and says when to stop.

    The metric is `stop.target.metric`; a spec without a target follows the metric of the
    first evaluation it sees. Evaluations of any other metric are ignored. Not thread-safe;
    owned by one job.

    Args:
        stop: the `stop` section of a normalised spec (see shardps.proto.spec).
    """

    def __init__(self, stop: StopSpec):
        target = stop.get("target")
        self.metric: str = target["metric"] if target else ""
        self.target: float | None = target["value"] if target else None
        self.patience = int(stop.get("patience", 0))
        self.min_delta = float(stop.get("min_delta", 0.0))
        self.latest: float | None = None
        self.best: float | None = None
        self.best_step = 0
        # Patience counts from the last improvement of more than min_delta, which is not
        # always the best value shown to users (a tiny gain moves `best`, not `_reference`).
        self._reference: float | None = None
        self._since_improvement = 0

    @property
    def has_eval(self) -> bool:
        return self.latest is not None

    def observe(self, step: int, metric: str, value: float) -> Verdict | None:
        """Feeds one evaluation; returns the verdict it causes, or None to go on.

        Raises:
            ValueError: a metric name shardps does not know (no direction to compare by).
        """
        if metric not in METRICS:
            raise ValueError(f"evals.metric: unknown metric {metric!r}; "
                             f"known are {', '.join(METRICS)}")
        if not self.metric:
            self.metric = metric
        if metric != self.metric:
            return None
        if not math.isfinite(value):
            return Verdict(common_pb2.JOB_STATE_FAILED,
                           f"evaluation {metric} became non-finite ({value}) at step {step}")
        self.latest = value
        if self.best is None or metric_improves(metric, value, self.best):
            self.best, self.best_step = value, step
        if self._reference is None or metric_improves(metric, value, self._reference,
                                                      self.min_delta):
            self._reference = value
            self._since_improvement = 0
        else:
            self._since_improvement += 1
        if self.target is not None and self._reached(value):
            return Verdict(common_pb2.JOB_STATE_CONVERGED,
                           f"{metric} {value:g} reached target {self.target:g} at step {step}")
        if self.patience and self._since_improvement >= self.patience:
            return Verdict(common_pb2.JOB_STATE_COMPLETED,
                           f"no improvement of more than {self.min_delta:g} in "
                           f"{self.patience} evaluations")
        return None

    def _reached(self, value: float) -> bool:
        assert self.target is not None
        return value >= self.target if METRICS[self.metric] else value <= self.target
