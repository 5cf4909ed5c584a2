"""One job as the coordinator holds it (`Job`), the errors its transitions raise, and the
state constants its modules share.

Pure: no gRPC, no clock. A Job is owned by its JobTable (jobs.py); only the table's modules
change it, under the lock of the table's owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shardps.proto import common_pb2
from shardps.proto.spec import JobSpec, dump_spec
from shardps.proto.states import FINAL_STATES

from .convergence import ConvergenceTracker
from .endings import Ending
from .history import JobHistory
from .recovery import Rollback

if TYPE_CHECKING:
    from .resharding import Reshard

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
    # Node ids: shard i starts on server i mod len(servers); during a reshard, the servers
    # before and after it.
    servers: list[str] = field(default_factory=list)
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
    reshard: Reshard | None = None  # the latest reshard (resharding.py), None if never
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

    def all_finished(self) -> bool:
        """Every live worker has reported that it finished training."""
        stats = self.history.workers
        return all(w in stats and stats[w].finished for w in self.workers)


def finished_reason(spec: JobSpec) -> str:
    """The reason a job that ran to its stop condition gives."""
    stop = spec["stop"]
    if stop["max_steps"]:
        return f"reached max_steps ({stop['max_steps']})"
    if stop["max_epochs"]:
        return f"reached max_epochs ({stop['max_epochs']:g})"
    return "finished"
