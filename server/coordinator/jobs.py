"""The job table and its state machine: submit, schedule, layout, activate, report, end.

Pure core: no gRPC and no clock of its own (`now` is monotonic seconds). The rules are those
of docs/architecture.md, "Job life cycle".
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from shardps.proto import common_pb2, names
from shardps.proto.layout import check_layout
from shardps.proto.spec import METRICS, JobSpec, NormalisedSpec, dump_spec, normalise
from shardps.proto.states import FINAL_STATES, state_name

from . import endings
from .convergence import ConvergenceTracker, Verdict, non_finite_loss
from .endings import Ending
from .history import MAX_POINTS, Evaluation, JobHistory, StepReport
from .membership import Membership, Node
from .recovery import Rollback, joiners, progress_reported, resume_servers, shard_restored
from .shardmap import build_shard_map

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 120.0  # a job assigned but not activated for this long is FAILED

PENDING = common_pb2.JOB_STATE_PENDING
RUNNING = common_pb2.JOB_STATE_RUNNING
COMPLETED = common_pb2.JOB_STATE_COMPLETED
CONVERGED = common_pb2.JOB_STATE_CONVERGED
FAILED = common_pb2.JOB_STATE_FAILED
CANCELLED = common_pb2.JOB_STATE_CANCELLED


class UnknownJobError(LookupError):
    """A job id the coordinator does not know (servicer: NOT_FOUND)."""


class JobStateError(Exception):
    """A call the job's state or the caller's place in the job does not allow: an illegal
    transition, or a node that is not the job's (rank-0) worker (servicer: FAILED_PRECONDITION)."""


@dataclass
class Job:
    """One job. Owned by its JobTable; callers read it, only the table changes it."""

    job_id: str
    spec: JobSpec  # normalised (shardps.proto.spec.parse_spec)
    created: float
    state: common_pb2.JobState = PENDING
    reason: str = ""
    ended: float | None = None
    servers: list[str] = field(default_factory=list)  # node ids in shard order
    workers: list[str] = field(default_factory=list)  # live workers in rank order
    assigned_workers: list[str] = field(default_factory=list)  # every worker it ever had
    epoch: int = 0  # membership epoch: 1 at assignment, +1 whenever a worker is lost
    assigned_at: float | None = None
    layout: common_pb2.Layout | None = None
    shard_map: common_pb2.ShardMap | None = None
    history: JobHistory = field(default_factory=JobHistory)
    rollback: Rollback = field(default_factory=Rollback)  # sync: the last checkpoint rollback
    resume_from: str = ""  # the ended job whose checkpoints this one continues from
    ending: Ending = field(default_factory=Ending)  # final version, late reports
    tracker: ConvergenceTracker = field(init=False)
    spec_yaml: str = ""  # the normalised spec as canonical YAML (dumped from spec if "")

    def __post_init__(self) -> None:
        self.tracker = ConvergenceTracker(self.spec["stop"])
        if not self.spec_yaml:
            self.spec_yaml = dump_spec(self.spec)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def sync(self) -> bool:
        return self.spec["consistency"]["mode"] == "sync"

    @property
    def initialising(self) -> bool:
        """Assigned to nodes, not yet activated."""
        return self.state == PENDING and bool(self.servers)

    def rank(self, node_id: str) -> int:
        """The node's rank among the live workers, -1 if it is not one."""
        return self.workers.index(node_id) if node_id in self.workers else -1


class JobTable:
    """Every job the coordinator knows, and the transitions between their states.

    Not thread-safe: the owner (the servicer) calls it under the same lock as its
    Membership, which most calls take as an argument.

    Args:
        init_timeout_s: how long an assigned job may take to be activated.
        max_points: loss points and evaluations kept per job.
    """

    def __init__(self, init_timeout_s: float = INIT_TIMEOUT_S, max_points: int = MAX_POINTS):
        self.init_timeout_s = init_timeout_s
        self.max_points = max_points
        self._jobs: dict[str, Job] = {}  # in submit order
        self._active: dict[str, Job] = {}  # the non-final ones
        self._settling: dict[str, Job] = {}  # ended, late step reports still count
        # Workers alive in a restored state that have not been heard from since: their jobs
        # take no new workers until they are back or lost (docs: "A full stop").
        self._awaiting: set[str] = set()

    def load(self, jobs: list[Job]) -> None:
        """Takes over saved jobs in submit order (coordinator restart); the table must be
        empty."""
        assert not self._jobs, "load into an empty JobTable"
        self._jobs = {j.job_id: j for j in jobs}
        self._active = {j.job_id: j for j in jobs if not j.final}
        self._settling = {j.job_id: j for j in jobs if j.ending.settle_by is not None}
        self._awaiting = {w for j in self._active.values() for w in j.workers}

    def node_seen(self, node_id: str) -> None:
        """A node called after a restore: it is back (its jobs may take workers again)."""
        self._awaiting.discard(node_id)

    # -- lookups ---------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """Raises UnknownJobError for an id never submitted."""
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJobError(f"unknown job {names.shown(job_id)}")
        return job

    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        return list(reversed(self._jobs.values()))

    def assignment(self, node_id: str) -> Job | None:
        """The non-final job a worker is a live member of, if any."""
        return next((j for j in self._active.values() if node_id in j.workers), None)

    def server_jobs(self, node_id: str) -> list[Job]:
        """Jobs whose shard map names this server, final ones included (so it can freeze)."""
        return [j for j in self._jobs.values() if j.shard_map is not None and node_id in j.servers]

    def hosted(self, node_id: str) -> int:
        """How many non-final jobs this server is assigned to (its load for scheduling)."""
        return sum(node_id in j.servers for j in self._active.values())

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
        normalised = normalise(spec_yaml) if isinstance(spec_yaml, str) else spec_yaml
        spec = normalised.spec
        if resume_from:
            self._check_resumable(resume_from, spec, membership)
        job_id = f"{spec['name']}-{secrets.token_hex(3)}"
        while job_id in self._jobs:
            job_id = f"{spec['name']}-{secrets.token_hex(3)}"
        job = Job(job_id, spec, now, history=JobHistory(self.max_points),
                  resume_from=resume_from, spec_yaml=normalised.text)
        self._jobs[job_id] = self._active[job_id] = job
        log.info("job %s submitted (needs %d servers, %d workers)", job_id,
                 spec["cluster"]["servers"], spec["cluster"]["workers"])
        self.schedule(membership, now)
        return job

    def schedule(self, membership: Membership, now: float) -> list[Job]:
        """Gives nodes to PENDING jobs that have none, oldest first; returns those assigned.

        A job gets `cluster.servers` alive servers (fewest hosted jobs first, then by id) and
        `cluster.workers` idle alive workers (by id; ranks follow). A job that cannot be
        served waits without holding nodes, so a later smaller job may start before it.
        """
        waiting = [j for j in self._active.values() if j.state == PENDING and not j.servers]
        short = [j for j in self._active.values()
                 if j.state == RUNNING and len(j.workers) < j.spec["cluster"]["workers"]
                 and not self._awaiting.intersection(j.workers)]
        if not waiting and not short:
            return []
        servers = membership.alive(common_pb2.ROLE_SERVER)
        load = {s.node_id: self.hosted(s.node_id) for s in servers}
        busy = {w for j in self._active.values() for w in j.workers}
        idle = [w.node_id for w in membership.alive(common_pb2.ROLE_WORKER)
                if w.node_id not in busy]
        assigned = []
        for job in waiting:
            need_servers = job.spec["cluster"]["servers"]
            need_workers = job.spec["cluster"]["workers"]
            resumed = None
            if job.resume_from:  # the servers holding its checkpoints, or wait for them
                resumed, why = self._resume_servers(job, membership)
                if resumed is None:
                    job.reason = why
                    continue
            if len(servers) < need_servers or len(idle) < need_workers:
                job.reason = (f"waiting for {need_servers} servers and {need_workers} workers "
                              f"(have {len(servers)}, {len(idle)})")
                continue
            chosen = resumed or sorted(load, key=lambda s: (load[s], s))[:need_servers]
            for server_id in chosen:
                load[server_id] += 1
            job.servers = chosen
            job.workers, idle = idle[:need_workers], idle[need_workers:]
            job.assigned_workers = list(job.workers)
            job.epoch = 1
            job.assigned_at = now
            job.reason = "initialising"
            assigned.append(job)
            log.info("job %s assigned: servers %s, workers %s", job.job_id,
                     ",".join(job.servers), ",".join(job.workers))
        for job in short:  # elastic: a running job that lost workers takes idle ones back
            joining = joiners(job.spec, job.workers, idle)
            if not joining:
                continue
            idle = [w for w in idle if w not in joining]
            job.workers += joining  # at the end: the others keep their ranks
            job.assigned_workers += [w for w in joining if w not in job.assigned_workers]
            job.epoch += 1
            log.info("job %s: worker(s) %s joined: %d workers, epoch %d", job.job_id,
                     ",".join(joining), len(job.workers), job.epoch)
        return assigned

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
        job = self.get(job_id)
        self._require_rank0(job, node_id, incarnation, membership, "set the layout of")
        check_layout(layout)
        if job.layout is not None:
            if layout == job.layout:
                assert job.shard_map is not None
                return job.shard_map
            raise JobStateError(f"job {job_id} already has layout {job.layout.fingerprint} "
                                f"({job.layout.total} elements); got {layout.fingerprint} "
                                f"({layout.total} elements)")
        shard_map = build_shard_map(
            layout.total, [(s, membership.get(s).address) for s in job.servers])
        job.layout = common_pb2.Layout()
        job.layout.CopyFrom(layout)
        job.shard_map = shard_map
        log.info("job %s layout %s: %d elements over %d servers", job_id, layout.fingerprint,
                 layout.total, len(job.servers))
        return shard_map

    def activate(self, job_id: str, node_id: str, incarnation: int, membership: Membership,
                 now: float) -> common_pb2.JobState:
        """The rank-0 worker has initialised every shard: the job is RUNNING (a repeat is
        harmless). Returns the state.

        Raises:
            UnknownJobError, UnknownNodeError: unknown ids.
            StaleNodeError, JobStateError: wrong caller, final job, or no layout yet.
        """
        job = self.get(job_id)
        self._require_rank0(job, node_id, incarnation, membership, "activate")
        if job.state == RUNNING:
            return job.state
        if job.layout is None:
            raise JobStateError(f"job {job_id} has no layout yet; call SetLayout first")
        job.state, job.reason = RUNNING, "training"
        log.info("job %s running (epoch %d, %d workers)", job_id, job.epoch, len(job.workers))
        return job.state

    def report_progress(self, job_id: str, node_id: str, incarnation: int,
                        membership: Membership, now: float,
                        steps: Sequence[StepReport] = (), evals: Sequence[Evaluation] = (),
                        finished: bool = False, failure: str = "", rollback_id: int = 0) -> common_pb2.JobState:
        """Records a worker's steps and evaluations and decides the job's fate.

        Order: steps (a non-finite loss fails the job), the worker's failure, evaluations
        (target or patience may end the job), then `finished`: from the rank-0 worker (after
        its final evaluation), or from the last live worker still training, it completes the
        job. A final job answers its state and records nothing. Before ActivateJob
        only a failure is accepted (it fails the job). Returns the state.

        Raises:
            UnknownJobError, UnknownNodeError: unknown ids.
            StaleNodeError, JobStateError: not a live worker of the job, or a progress
                report before the job runs.
            ValueError: a negative step or sample count, or an unknown metric (nothing
                recorded).
        """
        job = self.get(job_id)
        if job.final:
            self._late_steps(job, node_id, incarnation, membership, steps, now)
            return job.state
        membership.require(node_id, incarnation)
        if node_id not in job.workers:
            raise JobStateError(f"node {node_id} is not a live worker of job {job_id}")
        if job.state != RUNNING:
            # A worker that cannot even set up (model, dataset, layout) fails the job at once
            # rather than leaving it to the initialisation timeout.
            if failure:
                return self._end(job, Verdict(FAILED, f"worker {node_id} failed: {failure}"),
                                 now)
            raise JobStateError(f"job {job_id} is not running yet ({job.reason}); "
                                "report progress after ActivateJob")
        for s in steps:
            if s.step < 0 or s.samples < 0:
                raise ValueError(f"steps: step {s.step} with {s.samples} samples; "
                                 "neither may be negative")
        for e in evals:
            if e.step < 0 or e.metric not in METRICS:
                raise ValueError(f"evals: step {e.step}, metric {e.metric!r}; the step may "
                                 f"not be negative and the metric is one of {', '.join(METRICS)}")
        finite, reason, bad_step = [], None, None
        for s in steps:
            if reason := non_finite_loss(s.step, s.loss, node_id):
                bad_step = s.step  # not pushed: the weights end at that version (sync)
                break
            finite.append(s)
        job.history.record_steps(node_id, finite, now)
        if progress_reported(job.rollback, rollback_id, [s.step for s in finite]):
            log.info("job %s: rollback %d settled: every shard is past version %d", job_id,
                     job.rollback.id, job.rollback.version)
        job.history.settle(job.workers)
        if reason:
            return self._end(job, Verdict(FAILED, reason), now, version=bad_step)
        if failure:
            return self._end(job, Verdict(FAILED, f"worker {node_id} failed: {failure}"), now)
        for e in evals:
            job.history.record_eval(e)
            if verdict := job.tracker.observe(e.step, e.metric, e.value):
                # sync: rank 0 evaluated version e.step before pushing that step
                return self._end(job, verdict, now, version=e.step)
        if finished:
            job.history.worker(node_id).finished = True
            if job.rank(node_id) == 0 or self._all_finished(job):
                # Rank 0 evaluated the final version (its evaluation's step) before reporting.
                final = max((e.step for e in evals), default=None) if job.rank(node_id) == 0 else None
                return self._end(job, Verdict(COMPLETED, _finished_reason(job.spec)), now,
                                 version=final)
        return job.state

    def _late_steps(self, job: Job, node_id: str, incarnation: int, membership: Membership,
                    steps: Sequence[StepReport], now: float) -> None:
        """Step reports a worker of an ended job sent before it learned the verdict: those of
        steps whose gradients are in the final weights still go into its history."""
        if (job.job_id not in self._settling or node_id not in job.workers
                or not membership.current(node_id, incarnation)):
            return
        late = [s for s in steps if s.step >= 0 and s.samples >= 0 and math.isfinite(s.loss)
                and endings.counts(job.ending, s.step, now)]
        if late:
            job.history.record_steps(node_id, late, now)
            job.history.settle(job.workers)
            log.info("job %s: %d step report(s) of %s after the end recorded (up to step %d)",
                     job.job_id, len(late), node_id, late[-1].step)
        if not job.history.open_steps:
            self._settled(job)

    def _settled(self, job: Job) -> None:
        job.history.flush()
        job.ending.settle_by = None
        self._settling.pop(job.job_id, None)

    def shards_frozen(self, node_id: str, reports: Sequence[tuple[str, int, int]]) -> list[Job]:
        """A server froze shards (job, index, version) of ended sync jobs whose final version
        is not named yet. Returns the jobs whose final version this names."""
        named = []
        for job_id, index, version in reports:
            job = self._jobs.get(job_id)
            if (job is None or not job.final or not job.sync or not 0 <= index < len(job.servers)
                    or job.servers[index] != node_id):
                continue
            if endings.shard_frozen(job.ending, len(job.servers), index, version):
                job.history.discard_after(job.ending.final_version - 1)
                log.info("job %s: final version %d (the shards froze at %s)", job_id,
                         job.ending.final_version,
                         ", ".join(str(v) for _, v in sorted(job.ending.frozen.items())))
                named.append(job)
        return named

    def cancel(self, job_id: str, now: float) -> common_pb2.JobState:
        """Cancels a job; a final job keeps its state. Returns the state after the call."""
        job = self.get(job_id)
        if job.final:
            return job.state
        return self._end(job, Verdict(CANCELLED, "cancelled by a client"), now)

    # -- failures --------------------------------------------------------------------------

    def shard_restored(self, job_id: str, index: int, version: int, lost: int) -> bool:
        """A server restored shard `index` of a job from its checkpoint at `version`.

        A running sync job rolls back (see recovery.shard_restored): its servers and workers
        learn the rollback from their heartbeats. Other modes go on; `lost` updates are gone.
        Returns True if a new rollback started.
        """
        job = self._jobs.get(job_id)
        if job is None:
            log.info("a server restored shard %d of job %s, unknown here", index, job_id)
            return False
        mode = job.spec["consistency"]["mode"]
        if shard_restored(job.rollback, mode, job.state == RUNNING, version):
            log.warning("job %s: shard %d restored at version %d (%d updates past it lost): "
                        "rollback %d, every shard and worker goes back to version %d", job_id,
                        index, version, lost, job.rollback.id, job.rollback.version)
            return True
        log.warning("job %s (%s, %s): shard %d restored at version %d; %d update(s) lost",
                    job_id, mode, state_name(job.state), index, version, lost)
        return False

    def _holders(self, job_id: str, membership: Membership) -> dict[int, list[str]]:
        holders: dict[int, list[str]] = {}
        for node in membership.nodes():
            for stored_job, index in node.stored:
                if stored_job == job_id:
                    holders.setdefault(index, []).append(node.node_id)
        return holders

    def _check_resumable(self, old_id: str, spec: JobSpec,
                         membership: Membership) -> None:
        old = self._jobs.get(old_id)
        if old is None:
            holders = self._holders(old_id, membership)
            if not holders:
                raise UnknownJobError(f"unknown job {names.shown(old_id)}: no server reports "
                                      "checkpoints of it")
            shards = max(holders) + 1
        else:
            if not old.final:
                raise JobStateError(f"job {old_id} is still {state_name(old.state)}; cancel it "
                                    "before resuming it")
            if old.layout is None:
                raise JobStateError(f"job {old_id} never had weights: nothing to resume")
            shards = len(old.servers)
        if spec["cluster"]["servers"] != shards:
            raise ValueError(f"cluster.servers: must be {shards}, the shard count of job "
                             f"{old_id}, to resume it")

    def _resume_servers(self, job: Job, membership: Membership) -> tuple[list[str] | None, str]:
        old = self._jobs.get(job.resume_from)
        return resume_servers(job.spec["cluster"]["servers"], old.servers if old else [],
                              self._holders(job.resume_from, membership),
                              [s.node_id for s in membership.alive(common_pb2.ROLE_SERVER)])

    # -- membership changes ----------------------------------------------------------------

    def sweep(self, membership: Membership, now: float) -> list[Node]:
        """Expires leases (dropping dead workers from their jobs) and fails jobs that took
        too long to initialise. Returns the nodes that just died."""
        dead = membership.expire(now)
        for node in dead:
            self.node_lost(node.node_id, now, "lease expired")
        for job in list(self._active.values()):
            if job.initialising and now - (job.assigned_at or now) > self.init_timeout_s:
                self._end(job, Verdict(FAILED, "initialisation timed out"), now)
        for job in list(self._settling.values()):
            if job.ending.settle_by is None or now > job.ending.settle_by:
                self._settled(job)
        return dead

    def node_registered(self, node: Node, now: float) -> None:
        """Applies a re-registration: the previous incarnation of a worker has left its job,
        and a server that moved gets its new address into its jobs' shard maps."""
        if node.incarnation == 1:
            return
        if node.role == common_pb2.ROLE_WORKER:
            self.node_lost(node.node_id, now, "re-registered")
            return
        for job in self._jobs.values():  # ended ones too: their weights are exported from there
            if job.shard_map is None:
                continue
            moved = [s for s in job.shard_map.shards
                     if s.server_id == node.node_id and s.address != node.address]
            for shard in moved:
                shard.address = node.address
            if moved:
                job.shard_map.version += 1
                log.info("job %s: server %s moved to %s (shard map version %d)", job.job_id,
                         node.node_id, node.address, job.shard_map.version)

    def node_lost(self, node_id: str, now: float, why: str) -> None:
        """A worker is gone: every non-final job it worked on drops it, bumps its epoch and
        re-ranks the rest in their order; a job left without workers FAILS, and one whose
        remaining workers have all finished (the lost one was the rank 0 they were waiting
        for) COMPLETES."""
        self._awaiting.discard(node_id)
        for job in list(self._active.values()):
            if node_id not in job.workers:
                continue
            job.workers.remove(node_id)
            job.epoch += 1
            log.info("job %s lost worker %s (%s): %d left, epoch %d", job.job_id, node_id, why,
                     len(job.workers), job.epoch)
            if not job.workers:
                self._end(job, Verdict(FAILED, "all workers lost"), now)
            elif self._all_finished(job):
                self._end(job, Verdict(COMPLETED, _finished_reason(job.spec)), now)
            else:
                job.history.settle(job.workers)

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _all_finished(job: Job) -> bool:
        stats = job.history.workers
        return all(w in stats and stats[w].finished for w in job.workers)

    def _require_rank0(self, job: Job, node_id: str, incarnation: int,
                       membership: Membership, action: str) -> None:
        membership.require(node_id, incarnation)
        if job.final:
            raise JobStateError(f"job {job.job_id} has ended ({state_name(job.state)}: "
                                f"{job.reason})")
        if not job.servers:
            raise JobStateError(f"job {job.job_id} has no nodes yet ({job.reason})")
        if job.rank(node_id) != 0:
            raise JobStateError(f"only the rank-0 worker of job {job.job_id} "
                                f"({job.workers[0]}) may {action} it, not {node_id}")

    def _end(self, job: Job, verdict: Verdict, now: float, version: int | None = None) -> common_pb2.JobState:
        """Ends a job with `verdict`; `version` is the version the step that decided it
        names (sync: the final weights are there), None if no step did."""
        # Final states never change: the first verdict wins.
        if job.final:
            return job.state
        job.state, job.reason, job.ended = verdict.state, verdict.reason, now
        endings.begin(job.ending, job.sync, version, now)
        if job.ending.last_step is not None:
            job.history.discard_after(job.ending.last_step)
        job.history.settle(job.workers)
        if job.history.open_steps:  # reports of a rank that has not heard yet still count
            self._settling[job.job_id] = job
        else:
            job.ending.settle_by = None
        del self._active[job.job_id]
        final = job.ending.final_version
        log.info("job %s ended %s: %s%s", job.job_id, state_name(job.state), job.reason,
                 f" (final version {final})" if final >= 0 else "")
        return job.state


def _finished_reason(spec: JobSpec) -> str:
    stop = spec["stop"]
    if stop["max_steps"]:
        return f"reached max_steps ({stop['max_steps']})"
    if stop["max_epochs"]:
        return f"reached max_epochs ({stop['max_epochs']:g})"
    return "finished"
