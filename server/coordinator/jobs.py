"""The job table: every job the coordinator knows and the calls that move it through its
life cycle (submit, schedule, layout, activate, report, end).

Pure core: no gRPC and no clock of its own (`now` is monotonic seconds). JobTable is the one
entry point; each concern lives in its own module, over the table's JobStore:

- scheduling.py: submission and assignment (elastic rejoins, resumed jobs' servers)
- activation.py: the layout/activation handshake with the rank-0 worker
- reports.py: progress reports and the verdicts they bring
- settling.py: what still counts after a job's end (endings.py holds the rules)
- failures.py: lost, re-registered and moved nodes, restored shards, timeouts
- resharding.py: a running job's shards moved onto N servers (reshardplan.py plans it)

The rules are those of docs/architecture.md, "Job life cycle" and "Failures".
"""

from __future__ import annotations

from collections.abc import Sequence

from shardps.proto import common_pb2
from shardps.proto.spec import NormalisedSpec

from . import activation, failures, replicas, reports, resharding, scheduling, settling
from .convergence import Verdict
from .history import MAX_POINTS, Evaluation, StepReport
from .job import (
    CANCELLED,
    COMPLETED,
    CONVERGED,
    FAILED,
    PENDING,
    RUNNING,
    Job,
    JobStateError,
    UnknownJobError,
)
from .jobstore import JobStore
from .membership import Membership, Node

__all__ = ["CANCELLED", "COMPLETED", "CONVERGED", "FAILED", "INIT_TIMEOUT_S", "PENDING",
           "RUNNING", "Job", "JobStateError", "JobTable", "UnknownJobError"]

INIT_TIMEOUT_S = 120.0  # a job assigned but not activated for this long is FAILED


class JobTable:
    """Every job the coordinator knows, and the transitions between their states.

    Not thread-safe: the owner (the servicer) calls every method under the same lock as its
    Membership, which most calls take as an argument. The concern modules this table calls
    into run under that lock too, and are called from nowhere else.

    Args:
        init_timeout_s: how long an assigned job may take to be activated.
        max_points: loss points and evaluations kept per job.
    """

    def __init__(self, init_timeout_s: float = INIT_TIMEOUT_S, max_points: int = MAX_POINTS):
        self.init_timeout_s = init_timeout_s
        self.max_points = max_points
        self._store = JobStore()

    def load(self, jobs: list[Job]) -> None:
        """Takes over saved jobs in submit order (coordinator restart); the table must be
        empty."""
        self._store.load(jobs)

    def node_seen(self, node_id: str) -> None:
        """A node called after a restore: it is back (its jobs may take workers again)."""
        self._store.awaiting.discard(node_id)

    # -- lookups ---------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """Raises UnknownJobError for an id never submitted."""
        return self._store.get(job_id)

    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        return list(reversed(self._store.all.values()))

    def assignment(self, node_id: str) -> Job | None:
        """The non-final job a worker is a live member of, if any."""
        return next((j for j in self._store.active.values() if node_id in j.workers), None)

    def server_jobs(self, node_id: str) -> list[Job]:
        """Jobs whose shard map names this server, final ones included (so it can freeze)."""
        return [j for j in self._store.all.values()
                if j.shard_map is not None and node_id in j.servers]

    def hosted(self, node_id: str) -> int:
        """How many non-final jobs this server is assigned to (its load for scheduling)."""
        return self._store.hosted(node_id)

    # -- life cycle ------------------------------------------------------------------------

    def submit(self, spec_yaml: str | NormalisedSpec, membership: Membership, now: float,
               resume_from: str = "") -> Job:
        """Validates and queues a job, then schedules.

        `spec_yaml` is the spec's YAML text, or what `shardps.proto.spec.normalise` made of it
        (the servicer parses before it takes its lock: parsing a spec may take a while).
        `resume_from` names an ended job to continue: the new job runs on the servers holding
        that job's checkpoints (its own servers if known, else those that reported them).

        Raises:
            SpecError: the spec is invalid (nothing is stored).
            UnknownJobError: resume_from is unknown and no server holds checkpoints of it.
            JobStateError: resume_from has not ended, or never had weights.
            ValueError: the spec's cluster.servers differs from resume_from's shard count.
        """
        return scheduling.submit(self._store, spec_yaml, membership, now, resume_from,
                                 self.max_points)

    def schedule(self, membership: Membership, now: float) -> list[Job]:
        """Gives nodes to waiting jobs and idle workers back to running jobs short of them;
        returns the jobs just assigned (scheduling.schedule says the rules)."""
        return scheduling.schedule(self._store, membership, now)

    def set_layout(self, job_id: str, node_id: str, incarnation: int,
                   layout: common_pb2.Layout, membership: Membership,
                   now: float) -> common_pb2.ShardMap:
        """Stores the model layout from the job's rank-0 worker and returns the shard map.

        Sending the same layout again returns the same map.

        Raises:
            UnknownJobError, UnknownNodeError: unknown ids.
            StaleNodeError, JobStateError: wrong caller, final job, or a different layout.
            ValueError: an inconsistent layout, or fewer elements than servers.
        """
        return activation.set_layout(self.get(job_id), node_id, incarnation, layout, membership)

    def activate(self, job_id: str, node_id: str, incarnation: int, membership: Membership,
                 now: float) -> common_pb2.JobState:
        """The rank-0 worker has initialised every shard: the job is RUNNING (a repeat is
        harmless). Returns the state.

        Raises:
            UnknownJobError, UnknownNodeError: unknown ids.
            StaleNodeError, JobStateError: wrong caller, final job, or no layout yet.
        """
        return activation.activate(self.get(job_id), node_id, incarnation, membership)

    def report_progress(self, job_id: str, node_id: str, incarnation: int,
                        membership: Membership, now: float,
                        steps: Sequence[StepReport] = (), evals: Sequence[Evaluation] = (),
                        finished: bool = False, failure: str = "", rollback_id: int = 0) -> common_pb2.JobState:
        """Records a worker's steps and evaluations and decides the job's fate.

        Order: steps (a non-finite loss fails the job), the worker's failure, evaluations
        (target or patience may end the job), then `finished`: from the rank-0 worker (after
        its final evaluation), or from the last live worker still training, it completes the
        job. A final job answers its state and records nothing but the step reports that
        still count (settling.py). Before ActivateJob only a failure is accepted (it fails
        the job). Returns the state.

        Raises:
            UnknownJobError, UnknownNodeError: unknown ids.
            StaleNodeError, JobStateError: not a live worker of the job, or a progress
                report before the job runs.
            ValueError: a negative step or sample count, or an unknown metric (nothing
                recorded).
        """
        report = reports.Report(steps, evals, finished, failure, rollback_id)
        return reports.report_progress(self._store, self.get(job_id), node_id, incarnation,
                                       membership, now, report)

    def shards_frozen(self, node_id: str, reports: Sequence[tuple[str, int, int]]) -> list[Job]:
        """A server froze shards (job, index, version) of ended sync jobs whose final version
        is not named yet. Returns the jobs whose final version this names."""
        return settling.shards_frozen(self._store, node_id, reports)

    def cancel(self, job_id: str, now: float) -> common_pb2.JobState:
        """Cancels a job; a final job keeps its state. Returns the state after the call."""
        job = self.get(job_id)
        if job.final:
            return job.state
        return self._store.end(job, Verdict(CANCELLED, "cancelled by a client"), now)

    # -- failures --------------------------------------------------------------------------

    def shard_restored(self, job_id: str, index: int, version: int, lost: int) -> bool:
        """A server restored shard `index` of a job from its checkpoint at `version`; returns
        True if a sync job's new rollback started (failures.shard_restored)."""
        return failures.shard_restored(self._store, job_id, index, version, lost)

    def replica_holds(self, job_id: str, node_id: str, index: int) -> bool:
        """Whether a server is still a replica of a job's shard (replicas.holds; True for an
        unknown job or one without replicas)."""
        job = self._store.all.get(job_id)
        return job is None or replicas.holds(job.shard_map, node_id, index)

    def sweep(self, membership: Membership, now: float) -> list[Node]:
        """Expires leases (dropping dead workers from their jobs), fails jobs that took
        too long to initialise and moves running reshards on. Returns the nodes that just
        died."""
        died = failures.sweep(self._store, membership, now, self.init_timeout_s)
        self.advance_reshards(membership, now)
        return died

    def advance_reshards(self, membership: Membership, now: float) -> None:
        """Moves every running reshard on (resharding.advance): also called right after a
        server reports a copy caught up, so that its heartbeat's reply already names it the
        shard's primary (it would learn so a heartbeat later, the shard's pushes stalled
        meanwhile)."""
        resharding.advance_all(self._store.all.values(), membership, now)

    # -- resharding ------------------------------------------------------------------------

    def reshard(self, job_id: str, servers: int, membership: Membership,
                now: float) -> resharding.Reshard:
        """Starts spreading a running job's shards over `servers` servers
        (resharding.start); free servers with the fewest jobs are added first.

        Raises:
            UnknownJobError: an unknown job.
            JobStateError: the job is not running, is being resharded, or has a dead server.
            PlanError (a ValueError): `servers` out of range; nothing changes.
        """
        job = self.get(job_id)
        hosted = {n.node_id: self._store.hosted(n.node_id)
                  for n in membership.alive(common_pb2.ROLE_SERVER)}
        return resharding.start(job, servers, membership, hosted, now)

    def node_registered(self, node: Node, now: float) -> None:
        """Applies a re-registration: the previous incarnation of a worker has left its job,
        and a server that moved gets its new address into its jobs' shard maps."""
        failures.node_registered(self._store, node, now)

    def node_lost(self, node_id: str, now: float, why: str) -> None:
        """A worker is gone: its jobs drop it and re-rank the rest (failures.node_lost)."""
        failures.node_lost(self._store, node_id, now, why)
