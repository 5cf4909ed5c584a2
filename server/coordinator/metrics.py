"""Prometheus metrics of the coordinator: counters it bumps, and gauges read from its state
at scrape time (so no gauge can drift from the job table)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shardps.proto import common_pb2
from shardps.proto.states import FINAL_STATES, state_name

from .jobs import JobTable
from .membership import ROLE_PREFIXES, Membership

# A finished job's per-job series stay this long, so a scrape sees its final values, then
# go: the job label must not grow without bound on a long-lived coordinator.
ENDED_JOB_SERIES_S = 300.0

ROLES = tuple(ROLE_PREFIXES.values())
NODE_STATES = ("alive", "dead")
JOB_STATES = tuple(state_name(s).lower() for s in common_pb2.JobState.values() if s)


@dataclass
class JobSample:
    job_id: str
    step: int
    loss: float
    best_metric: float | None  # None before the first evaluation
    steps_per_s: float
    workers: list[tuple[str, int, float]] = field(default_factory=list)  # live (node, step, steps/s)


@dataclass
class Snapshot:
    """What the gauges show, copied out of the state under its owner's lock."""

    nodes: dict[tuple[str, str], int] = field(default_factory=dict)  # (role, state) -> count
    jobs: dict[str, int] = field(default_factory=dict)  # state -> count
    job_samples: list[JobSample] = field(default_factory=list)


def take_snapshot(membership: Membership, jobs: JobTable, now: float) -> Snapshot:
    """Counts nodes and jobs and reads the recent jobs' progress (caller holds the lock)."""
    snap = Snapshot(nodes={(r, s): 0 for r in ROLES for s in NODE_STATES},
                    jobs={s: 0 for s in JOB_STATES})
    for node in membership.nodes():
        snap.nodes[(node.role_name, "alive" if node.alive else "dead")] += 1
    for job in jobs.jobs():
        snap.jobs[state_name(job.state).lower()] += 1
        if job.state in FINAL_STATES and now - (job.ended or now) > ENDED_JOB_SERIES_S:
            continue
        tracker = job.tracker
        workers = []
        if job.state not in FINAL_STATES:
            for node_id in job.workers:
                stats = job.history.workers.get(node_id)
                if stats is not None:
                    workers.append((node_id, stats.step, stats.meter.rate(now)))
        snap.job_samples.append(JobSample(
            job.job_id, job.history.step, job.history.latest_loss(job.workers),
            tracker.best if tracker.has_eval else None, job.history.steps_per_s(now), workers))
    return snap


class CoordinatorMetrics:
    """The coordinator's metrics on one registry.

    Counters are bumped by the servicer; gauges call `snapshot` on every scrape, from the
    metrics server's thread, so `snapshot` must take the state's lock itself.
    """

    def __init__(self, registry: CollectorRegistry, snapshot: Callable[[], Snapshot]):
        self.lease_expiries = Counter(
            "shardps_coordinator_lease_expiries", "Nodes declared dead because their lease ran out",
            ["role"], registry=registry)
        for role in ROLES:
            self.lease_expiries.labels(role)
        self.jobs_submitted = Counter(
            "shardps_coordinator_jobs_submitted", "Jobs accepted by SubmitJob", registry=registry)
        self.rejected_specs = Counter(
            "shardps_coordinator_rejected_specs", "Job specs rejected as invalid by SubmitJob",
            registry=registry)
        self.state_restores = Counter(
            "shardps_coordinator_state_restores", "Starts that loaded a saved state dir",
            registry=registry)
        self.state_writes = Counter(
            "shardps_coordinator_state_writes", "Writes of the state dir, by result",
            ["result"], registry=registry)
        self.state_bytes = Gauge(
            "shardps_coordinator_state_bytes", "Size of the last state written",
            registry=registry)
        self.shard_restores = Counter(
            "shardps_coordinator_shard_restores",
            "Shards that servers reported restored from a checkpoint", registry=registry)
        self.lost_updates = Counter(
            "shardps_coordinator_lost_updates",
            "Updates past the restored checkpoints, as the servers reported them (sync jobs "
            "replay them)", registry=registry)
        self.rollbacks = Counter(
            "shardps_coordinator_rollbacks",
            "sync rollbacks started: every shard and worker of a job back to a checkpoint",
            registry=registry)
        self.long_polls = Counter(
            "shardps_coordinator_long_polls",
            "Long-polls that were held, by call (heartbeat: an idle worker waiting for an "
            "assignment; get_job: waiting for a job's state to change) and how they ended: woken "
            "(what they waited for happened), timed_out, cancelled (by the caller, or the "
            "coordinator stopping), or over_limit (answered at once: --max-held-calls were held)",
            ["call", "outcome"], registry=registry)
        for call in ("heartbeat", "get_job"):
            for outcome in ("woken", "timed_out", "cancelled", "over_limit"):
                self.long_polls.labels(call, outcome)
        self.held_calls = Gauge(
            "shardps_coordinator_held_calls",
            "Long-polls held now (at most --max-held-calls)", registry=registry)
        registry.register(_StateCollector(snapshot))


class _StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]):
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        # Names only; describing must not take the state's lock.
        yield from _families()

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        nodes, jobs, step, loss, best, rate, worker_step, worker_rate, straggler = _families()
        for (role, state), count in snap.nodes.items():
            nodes.add_metric([role, state], count)
        for state, count in snap.jobs.items():
            jobs.add_metric([state], count)
        for s in snap.job_samples:
            step.add_metric([s.job_id], s.step)
            loss.add_metric([s.job_id], s.loss)
            rate.add_metric([s.job_id], s.steps_per_s)
            if s.best_metric is not None:
                best.add_metric([s.job_id], s.best_metric)
            for node_id, node_step, node_rate in s.workers:
                worker_step.add_metric([s.job_id, node_id], node_step)
                worker_rate.add_metric([s.job_id, node_id], node_rate)
            if len(s.workers) > 1:
                slowest = min(s.workers, key=lambda w: w[1])
                lead = max(w[1] for w in s.workers)
                straggler.add_metric([s.job_id, slowest[0]], lead - slowest[1])
        yield from (nodes, jobs, step, loss, best, rate, worker_step, worker_rate, straggler)


def _families() -> tuple[GaugeMetricFamily, ...]:
    def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"shardps_coordinator_{name}", doc, labels=labels)

    return (
        gauge("nodes", "Registered nodes by role and lease state", ["role", "state"]),
        gauge("jobs", "Jobs by state", ["state"]),
        gauge("job_step", "Highest step reported for a job", ["job"]),
        gauge("job_loss", "Latest training loss of a job (mean over its live workers)", ["job"]),
        gauge("job_best_metric", "Best evaluation of a job's stop metric so far", ["job"]),
        gauge("job_steps_per_second", "Recent training rate of a job", ["job"]),
        gauge("worker_step", "Highest step a live worker of a running job reported", ["job", "worker"]),
        gauge("worker_steps_per_second", "Recent training rate of a live worker", ["job", "worker"]),
        gauge("job_straggler_lag_steps",
              "The slowest live worker of a running job (label) and how many steps it trails the fastest",
              ["job", "worker"]),
    )
