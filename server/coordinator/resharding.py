"""Live resharding (docs/architecture.md, "Resharding"): a running job's shards spread over N
servers by moving shard copies while the job trains.

`start` plans the moves (reshardplan.py) and `advance`, called on every sweep, carries them
out, at most MAX_MOVING at a time. Each move is a sequence of changes to the shard's copies
(rereplication.py): add a joining copy on the target (it gets the shard by transfer from the
primary while pushes go on), wait until it has caught up and is a backup, promote it if the
source was the primary, drop the source. Each change is a new replica epoch, and the
coordinator is the only writer of the map, so no epoch has two primaries of a shard.

Pure: no gRPC; `now` is monotonic seconds passed in. Not thread-safe: called under the
coordinator's lock, through the JobTable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from shardps.proto import coordinator_pb2 as pb
from shardps.proto.states import state_name

from .activation import shown_tables
from .job import RUNNING, Job, JobStateError
from .membership import Membership
from .rereplication import add_copy, copies, drop_copy, promote
from .reshardplan import Move, choose_servers, plan_moves

log = logging.getLogger(__name__)

MAX_MOVING = 2  # moves in flight at once: the job keeps stepping between their switches
# A joining copy not caught up within this long is dropped and added again, up to MAX_TRIES
# times; then the reshard fails (the moves done so far stay done).
JOIN_TIMEOUT_S = 120.0
MAX_TRIES = 3
WAITING, JOINING, DONE = "waiting", "joining", "done"  # ShardMove.phase


@dataclass
class MoveRun:
    """One planned move and how far it got."""

    move: Move
    phase: str = WAITING
    since: float = 0.0  # when its current try began (monotonic s)
    tries: int = 0


@dataclass
class Reshard:
    """A job's latest reshard. Not persisted: a coordinator restart ends it where it stands
    (every change it made is in the persisted map; `shardps reshard` again goes on)."""

    before: list[str]
    after: list[str]
    runs: list[MoveRun]
    started: float
    state: pb.ReshardState = pb.RESHARD_STATE_RUNNING
    message: str = ""
    ended: float | None = None
    # Sources whose copies were dropped -> when: a reshard is done once each has heard so
    # (a heartbeat after that time), so that none still acts on the shards it gave up.
    dropped: dict[str, float] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == pb.RESHARD_STATE_RUNNING


def start(job: Job, n: int, membership: Membership, hosted: dict[str, int],
          now: float) -> Reshard:
    """Plans a reshard of `job` to `n` servers and starts its first moves. `hosted` is each
    alive server's count of non-final jobs (free servers with the fewest are taken first).

    Raises:
        JobStateError: the job is not running, or a reshard of it is running, or a server
            holding one of its shards is dead.
        PlanError: n is out of range (reshardplan.choose_servers); nothing changes.
    """
    _check_startable(job, membership)
    assert job.shard_map is not None
    shards = job.shard_map.shards
    current = [s for s in job.servers if s in hosted]  # alive (a lost one holds no copy)
    free = sorted((s for s in hosted if s not in job.servers), key=lambda s: (hosted[s], s))
    after = choose_servers(current, n, free, shards=len(shards),
                           replicas=int(job.spec["cluster"].get("replicas", 1)))
    if int(job.spec["cluster"].get("replicas", 1)) == 1:
        for shard in shards:  # joining copies left by a reshard a coordinator restart ended
            for joiner in list(shard.joining_ids):
                drop_copy(job, shard.index, joiner)
    moves = plan_moves([[s.server_id, *s.backup_ids] for s in shards], after)
    reshard = Reshard(list(job.servers), after, [MoveRun(m) for m in moves], now)
    job.reshard = reshard
    job.servers = list(dict.fromkeys([*job.servers, *after]))
    log.info("job %s: reshard from %d to %d servers (%s): %d move(s)%s", job.job_id,
             len(reshard.before), n, ",".join(after), len(moves),
             "".join(f"; shard {m.index} {m.source} -> {m.target}" for m in moves))
    advance(job, membership, now)
    return reshard


def _check_startable(job: Job, membership: Membership) -> None:
    if job.state != RUNNING or job.shard_map is None:
        raise JobStateError(f"job {job.job_id} is {state_name(job.state)}; only a running job "
                            "can be resharded")
    if job.layout is not None and job.layout.tables:
        raise JobStateError(f"job {job.job_id} has embedding tables ({shown_tables(job.layout)}); "
                            "a job with tables cannot be resharded yet (their rows are not "
                            "transferred)")
    if job.reshard is not None and job.reshard.running:
        done = sum(r.phase == DONE for r in job.reshard.runs)
        raise JobStateError(f"job {job.job_id} is already being resharded to "
                            f"{len(job.reshard.after)} servers ({done} of "
                            f"{len(job.reshard.runs)} moves done)")
    for shard in job.shard_map.shards:
        for server in copies(shard):
            node = membership.find(server)
            if node is None or not node.alive:
                raise JobStateError(f"server {server} of job {job.job_id} (shard "
                                    f"{shard.index}) is dead; reshard once it is back or "
                                    "replaced")


def advance_all(jobs: Iterable[Job], membership: Membership, now: float) -> None:
    """advance() for every job with a running reshard."""
    for job in jobs:
        if job.reshard is not None and job.reshard.running:
            advance(job, membership, now)


def advance(job: Job, membership: Membership, now: float) -> None:
    """Moves the job's reshard on as far as the map allows now: finishes moves whose copy
    caught up, retries or fails those that did not, starts waiting ones, and ends the
    reshard once every move is done and every source has heard of it."""
    reshard = job.reshard
    if reshard is None or not reshard.running:
        return
    if job.final or job.shard_map is None:
        if all(r.phase == DONE for r in reshard.runs):  # only the sources' hearing was left
            job.servers = list(reshard.after)
            _end(job, pb.RESHARD_STATE_DONE, f"on {len(reshard.after)} servers", now)
        else:
            _end(job, pb.RESHARD_STATE_FAILED, f"the job ended ({state_name(job.state)})", now)
        return
    for run in reshard.runs:
        if run.phase == JOINING:
            _step(job, run, membership, now)
            if not reshard.running:
                return
    for run in reshard.runs:
        if sum(r.phase == JOINING for r in reshard.runs) >= MAX_MOVING:
            break
        if run.phase == WAITING:
            _begin(job, run, membership, now)
            if not reshard.running:
                return
    if all(r.phase == DONE for r in reshard.runs) and all(
            _heard(membership, server, when) for server, when in reshard.dropped.items()):
        job.servers = list(reshard.after)
        _end(job, pb.RESHARD_STATE_DONE, f"on {len(reshard.after)} servers", now)


def _heard(membership: Membership, server: str, since: float) -> bool:
    """Whether a server has heartbeated since `since` (or is gone)."""
    node = membership.find(server)
    return node is None or not node.alive or node.last_seen > since


def _begin(job: Job, run: MoveRun, membership: Membership, now: float) -> None:
    """Adds the move's target as a joining copy (a try)."""
    assert job.shard_map is not None
    move = run.move
    node = membership.find(move.target)
    if node is None or not node.alive:
        _end(job, pb.RESHARD_STATE_FAILED, f"server {move.target}, the target of shard "
                                           f"{move.index}, is dead", now)
        return
    run.phase, run.since, run.tries = JOINING, now, run.tries + 1
    if move.target not in copies(job.shard_map.shards[move.index]):
        add_copy(job, move.index, move.target, node.address)
    log.info("job %s: reshard: shard %d moving %s -> %s (try %d)", job.job_id, move.index,
             move.source, move.target, run.tries)


def _step(job: Job, run: MoveRun, membership: Membership, now: float) -> None:
    """A joining move: done once the target is a backup; else retried after a timeout."""
    assert job.shard_map is not None and job.reshard is not None
    move = run.move
    shard = job.shard_map.shards[move.index]
    if move.target == shard.server_id or move.target in shard.backup_ids:
        if shard.server_id == move.source:
            promote(job, move.index, move.target)
        if move.source in copies(shard):
            drop_copy(job, move.index, move.source)
        run.phase = DONE
        job.reshard.dropped[move.source] = now
        log.info("job %s: reshard: shard %d moved %s -> %s (replica epoch %d)", job.job_id,
                 move.index, move.source, move.target, shard.replica_epoch)
        return
    joining = move.target in shard.joining_ids
    if joining and now - run.since <= JOIN_TIMEOUT_S:
        return
    if joining:
        drop_copy(job, move.index, move.target)
    why = "did not catch up in time" if joining else "was dropped before it caught up"
    if run.tries >= MAX_TRIES:
        _end(job, pb.RESHARD_STATE_FAILED, f"shard {move.index}: the copy on {move.target} "
                                           f"{why} ({run.tries} tries)", now)
        return
    log.warning("job %s: reshard: shard %d: the copy on %s %s; trying again", job.job_id,
                move.index, move.target, why)
    _begin(job, run, membership, now)


def _end(job: Job, state: pb.ReshardState, message: str, now: float) -> None:
    reshard = job.reshard
    assert reshard is not None
    reshard.state, reshard.message, reshard.ended = state, message, now
    if state != pb.RESHARD_STATE_DONE and job.shard_map is not None:
        held = {s for shard in job.shard_map.shards for s in copies(shard)}
        job.servers = [s for s in dict.fromkeys([*reshard.before, *reshard.after]) if s in held]
    done = sum(r.phase == DONE for r in reshard.runs)
    log_at = logging.INFO if state == pb.RESHARD_STATE_DONE else logging.WARNING
    log.log(log_at, "job %s: reshard %s after %d of %d moves: %s", job.job_id,
            "done" if state == pb.RESHARD_STATE_DONE else "failed", done, len(reshard.runs),
            message)


def progress(reshard: Reshard | None, now: float) -> pb.ReshardProgress:
    """A reshard as JobInfo.reshard shows it (empty for a job never resharded)."""
    if reshard is None:
        return pb.ReshardProgress()
    end = reshard.ended if reshard.ended is not None else now
    return pb.ReshardProgress(
        state=reshard.state, servers_before=reshard.before, servers_after=reshard.after,
        moves_total=len(reshard.runs), moves_done=sum(r.phase == DONE for r in reshard.runs),
        moves=[pb.ShardMove(shard_index=r.move.index, source=r.move.source,
                            target=r.move.target, primary=r.move.primary, phase=r.phase)
               for r in reshard.runs],
        message=reshard.message, elapsed_ms=int(max(0.0, end - reshard.started) * 1000))
