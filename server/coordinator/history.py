"""Training history of one job: per-step loss across workers, evaluations and rates."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MAX_POINTS = 100_000  # loss points (and evaluations) kept per job; the oldest are dropped
RATE_WINDOW_S = 10.0  # steps/s is measured over reports of the last this many seconds
# Steps still waiting for a slow worker's report. Past this, the oldest are closed with the
# reports they have, so an async job with a stalled worker does not grow without bound.
MAX_OPEN_STEPS = 10_000


@dataclass(frozen=True)
class StepReport:
    """One worker's training step, as reported."""

    step: int
    loss: float
    samples: int
    duration_ms: float = 0.0


@dataclass(frozen=True)
class Evaluation:
    """One evaluation on the held-out split."""

    step: int
    metric: str
    value: float
    loss: float = 0.0


class RateMeter:
    """Steps per second from (time, step) samples of the last `window_s` seconds."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, step: int) -> None:
        self._samples.append((now, step))
        self._prune(now)

    def rate(self, now: float) -> float:
        """0 when fewer than two samples are recent (a stalled job decays to 0)."""
        self._prune(now)
        if len(self._samples) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    def _prune(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()


@dataclass
class WorkerStats:
    """Latest progress of one worker of a job."""

    node_id: str
    step: int = -1  # highest step reported, -1 before the first report
    loss: float = 0.0
    samples: int = 0  # samples in its latest batch (weights its loss)
    finished: bool = False
    meter: RateMeter = field(default_factory=RateMeter, repr=False)


class _OpenStep:
    __slots__ = ("weighted", "samples", "plain", "count")

    def __init__(self) -> None:
        self.weighted = self.plain = 0.0
        self.samples = self.count = 0

    def add(self, loss: float, samples: int) -> None:
        self.weighted += loss * samples
        self.samples += samples
        self.plain += loss
        self.count += 1

    def mean(self) -> float:
        # Batch-size-weighted, as the servers weight gradients; a plain mean if every
        # report said 0 samples.
        return self.weighted / self.samples if self.samples else self.plain / self.count


class JobHistory:
    """Loss per step (batch-size-weighted mean over the workers' reports), evaluations,
    samples and rates of one job.

    A step's loss point is written once every live worker has reported it or moved past
    it. Not thread-safe; owned by one job.

    Args:
        max_points: the most loss points and evaluations kept (oldest dropped first).
    """

    def __init__(self, max_points: int = MAX_POINTS):
        self.losses: deque[tuple[int, float]] = deque(maxlen=max_points)
        self.evals: deque[Evaluation] = deque(maxlen=max_points)
        self.workers: dict[str, WorkerStats] = {}
        self.step = 0  # highest step any worker reported (training step or evaluation)
        self.samples = 0
        self._open: dict[int, _OpenStep] = {}
        self._meter = RateMeter()

    @property
    def open_steps(self) -> int:
        """Steps some live worker may still report (their loss points are not written)."""
        return len(self._open)

    def worker(self, node_id: str) -> WorkerStats:
        if node_id not in self.workers:
            self.workers[node_id] = WorkerStats(node_id)
        return self.workers[node_id]

    def record_steps(self, node_id: str, steps: Iterable[StepReport], now: float) -> None:
        """Adds a worker's step reports; a step at or below its latest one is a resent
        report and ignored."""
        stats = self.worker(node_id)
        for report in steps:
            if report.step <= stats.step:
                continue
            stats.step, stats.loss, stats.samples = report.step, report.loss, report.samples
            self.samples += report.samples
            self._open.setdefault(report.step, _OpenStep()).add(report.loss, report.samples)
            self.step = max(self.step, report.step)
        stats.meter.add(now, max(stats.step, 0))
        self._meter.add(now, self.step)

    def record_eval(self, evaluation: Evaluation) -> None:
        self.evals.append(evaluation)
        self.step = max(self.step, evaluation.step)

    def settle(self, live: Sequence[str]) -> None:
        """Writes the loss points of every step no live worker can still report."""
        reached = [self.workers[w].step if w in self.workers else -1 for w in live]
        done = min(reached) if reached else None
        for step in sorted(self._open):
            if done is not None and step > done and len(self._open) <= MAX_OPEN_STEPS:
                break
            self.losses.append((step, self._open.pop(step).mean()))

    def discard_after(self, step: int) -> None:
        """Forgets open steps past `step` (the job ended before their gradients counted)."""
        for later in [s for s in self._open if s > step]:
            del self._open[later]

    def flush(self) -> None:
        """Writes every open step (the job has ended; no more reports will count)."""
        self.settle(())

    def latest_loss(self, live: Sequence[str]) -> float:
        """Batch-size-weighted mean of the live workers' latest losses (0 before any)."""
        mean = _OpenStep()
        for w in live:
            stats = self.workers.get(w)
            if stats and stats.step >= 0:
                mean.add(stats.loss, stats.samples)
        return mean.mean() if mean.count else 0.0

    def steps_per_s(self, now: float) -> float:
        """Job-wide rate of the highest step over the recent window."""
        return self._meter.rate(now)
