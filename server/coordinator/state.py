"""The coordinator's state dir: node table and job table (specs, layouts, shard maps,
histories, verdict trackers, rollbacks) as one msgpack document, replaced atomically.

`dump` and `restore` are pure and take `now` (monotonic) and `wall` (unix seconds) so that
times survive the restart. They read and set the private counters of JobHistory and
ConvergenceTracker: this module is the one place that knows their persistent form.
`StateFile` writes a temp file, fsyncs it, renames it over the old one and fsyncs the
directory; it reads back only a document whose sha256 verifies.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import msgpack

from shardps.proto import common_pb2
from shardps.proto.spec import JobSpec, SpecError, parse_spec

from .endings import Ending
from .history import Evaluation, JobHistory, WorkerStats, _OpenStep
from .jobs import Job, JobTable
from .membership import Membership, Node
from .recovery import Rollback

log = logging.getLogger(__name__)

FORMAT = 1
FILE = "coordinator.msgpack"
# After a restart no lease expires for one lease plus this long: daemons retrying the
# unreachable coordinator with backoff (workers up to 10 s, gRPC reconnects up to 2 s) find
# it back without being declared dead.
RESTART_GRACE_S = 12.0


class StateError(Exception):
    """The state file exists but cannot be used (corrupt, or another format)."""


# -- conversion -----------------------------------------------------------------------------


def structure(membership: Membership, jobs: JobTable) -> tuple:
    """What must be on disk before a reply goes out: node incarnations and liveness, each
    job's state, nodes, epoch, layout, shard map and rollback. (Loss histories may lag.)"""
    nodes = tuple((n.node_id, n.incarnation, n.alive, n.address, tuple(n.stored))
                  for n in membership.nodes())
    table = tuple((j.job_id, j.state, tuple(j.servers), tuple(j.workers), j.epoch,
                   j.layout is not None,
                   j.shard_map.SerializeToString() if j.shard_map is not None else b"",
                   j.rollback.id, j.rollback.settled, j.ending.final_version,
                   tuple(sorted(j.ending.frozen.items()))) for j in jobs.jobs())
    return nodes, table


def dump(membership: Membership, jobs: JobTable, now: float, wall: float,
         cache: dict[str, tuple[tuple, dict]] | None = None) -> dict[str, Any]:
    """The whole state as plain msgpack-able data.

    `cache` (job id -> (key, dumped job)) skips re-dumping final jobs while what can still
    change about them (shard map, final version, late reports) has not.
    """
    def unix(t: float | None) -> float | None:
        return None if t is None else wall - (now - t)

    out_jobs = []
    for job in reversed(jobs.jobs()):  # submit order
        key = (job.shard_map.version if job.shard_map is not None else -1,
               job.ending.final_version, len(job.ending.frozen), job.ending.settle_by,
               job.history.samples)
        if cache is not None and job.job_id in cache and cache[job.job_id][0] == key:
            out_jobs.append(cache[job.job_id][1])
            continue
        dumped = _dump_job(job, unix)
        if cache is not None and job.final:
            cache[job.job_id] = (key, dumped)
        out_jobs.append(dumped)
    return {
        "format": FORMAT,
        "saved_unix": wall,
        "nodes": [{
            "node_id": n.node_id, "role": n.role, "address": n.address,
            "incarnation": n.incarnation, "alive": n.alive,
            "metrics_address": n.metrics_address, "device": n.device, "hostname": n.hostname,
            "stored": [list(s) for s in n.stored], "last_seen": unix(n.last_seen),
        } for n in membership.nodes()],
        "jobs": out_jobs,
    }


def _dump_job(job: Job, unix) -> dict[str, Any]:
    h, t = job.history, job.tracker
    return {
        "job_id": job.job_id, "spec_yaml": job.spec_yaml, "created": unix(job.created),
        "state": job.state, "reason": job.reason, "ended": unix(job.ended),
        "servers": list(job.servers), "workers": list(job.workers),
        "assigned_workers": list(job.assigned_workers), "epoch": job.epoch,
        "assigned_at": unix(job.assigned_at),
        "layout": job.layout.SerializeToString() if job.layout is not None else None,
        "shard_map": job.shard_map.SerializeToString() if job.shard_map is not None else None,
        "rollback": [job.rollback.id, job.rollback.version, job.rollback.settled],
        "resume_from": job.resume_from,
        "ending": [job.ending.final_version, [list(f) for f in job.ending.frozen.items()],
                   job.ending.last_step, unix(job.ending.settle_by)],
        "history": {
            "losses": [list(p) for p in h.losses],
            "evals": [[e.step, e.metric, e.value, e.loss] for e in h.evals],
            "workers": {w: [s.step, s.loss, s.samples, s.finished] for w, s in h.workers.items()},
            "step": h.step, "samples": h.samples,
            "open": [[step, o.weighted, o.samples, o.plain, o.count]
                     for step, o in h._open.items()],
        },
        "tracker": [t.metric, t.latest, t.best, t.best_step, t._reference,
                    t._since_improvement],
    }


def restore(doc: dict[str, Any], membership: Membership, jobs: JobTable, now: float,
            wall: float) -> None:
    """Loads a dumped state into an empty Membership and JobTable.

    Nodes alive at the dump are alive again with a fresh lease (they heartbeat on with the
    same incarnation; one that died meanwhile expires after a lease and RESTART_GRACE_S).

    A job's spec is validated again, as at submit: an older version may have stored one that
    today's limits refuse. Its numbers out of range are clamped into range (logged), so that
    no stored value can break listing the jobs; a job whose spec is still refused after that
    is left out (logged as an error) rather than keeping the coordinator from starting.

    Raises:
        StateError: a format this code does not read.
    """
    if doc.get("format") != FORMAT:
        raise StateError(f"state format {doc.get('format')!r}, expected {FORMAT}")

    def mono(t: float | None) -> float | None:
        return None if t is None else now - (wall - t)

    membership.load([Node(
        node_id=n["node_id"], role=n["role"], address=n["address"],
        incarnation=n["incarnation"], last_seen=now, alive=n["alive"],
        metrics_address=n["metrics_address"], device=n["device"], hostname=n["hostname"],
        stored=[(job, index) for job, index in n["stored"]]) for n in doc["nodes"]],
        now, RESTART_GRACE_S)
    loaded = []
    for d in doc["jobs"]:
        spec = _restored_spec(d["job_id"], d["spec_yaml"])
        if spec is None:
            continue
        history = JobHistory(jobs.max_points)
        job = Job(d["job_id"], spec, mono(d["created"]) or now, state=d["state"],
                  reason=d["reason"], ended=mono(d["ended"]), servers=list(d["servers"]),
                  workers=list(d["workers"]), assigned_workers=list(d["assigned_workers"]),
                  epoch=d["epoch"], assigned_at=mono(d["assigned_at"]), history=history,
                  resume_from=d["resume_from"])
        if d["layout"] is not None:
            job.layout = common_pb2.Layout.FromString(d["layout"])
        if d["shard_map"] is not None:
            job.shard_map = common_pb2.ShardMap.FromString(d["shard_map"])
        job.rollback = Rollback(*d["rollback"])
        if "ending" in d:  # states saved before endings were kept have none
            final_version, frozen, last_step, settle_by = d["ending"]
            job.ending = Ending(final_version, {i: v for i, v in frozen}, last_step,
                                mono(settle_by))
        _restore_history(history, d["history"])
        t = job.tracker
        (t.metric, t.latest, t.best, t.best_step, t._reference,
         t._since_improvement) = d["tracker"]
        loaded.append(job)
    jobs.load(loaded)


def _restored_spec(job_id: str, text: str) -> JobSpec | None:
    """The stored spec, validated (numbers clamped into range), or None if it is refused."""
    try:
        return parse_spec(text)
    except SpecError as exc:
        refused = exc
    clamped: list[str] = []
    try:
        spec = parse_spec(text, clamped=clamped)
    except SpecError:
        log.error("job %s left out of the restored state: its spec is no longer accepted "
                  "(%s)", job_id, refused)
        return None
    log.warning("job %s: its stored spec had numbers out of range, now clamped: %s", job_id,
                "; ".join(clamped))
    return spec


def _restore_history(h: JobHistory, d: dict[str, Any]) -> None:
    h.losses.extend((step, loss) for step, loss in d["losses"])
    h.evals.extend(Evaluation(*e) for e in d["evals"])
    for w, (step, loss, samples, finished) in d["workers"].items():
        h.workers[w] = WorkerStats(w, step, loss, samples, finished)
    h.step, h.samples = d["step"], d["samples"]
    for step, weighted, samples, plain, count in d["open"]:
        o = _OpenStep()
        o.weighted, o.samples, o.plain, o.count = weighted, samples, plain, count
        h._open[step] = o


# -- the file -------------------------------------------------------------------------------


class StateFile:
    """`<directory>/coordinator.msgpack`, replaced atomically. Not thread-safe: one owner."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / FILE

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None if there is none yet. Raises StateError if unusable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            outer = msgpack.unpackb(raw, raw=False)
            body = outer["body"]
            if hashlib.sha256(body).hexdigest() != outer["sha256"]:
                raise StateError(f"{self.path}: checksum mismatch")
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise StateError(f"{self.path}: unreadable ({exc})") from None

    def save(self, doc: dict[str, Any]) -> int:
        """Writes the state durably (temp file, fsync, rename, fsync dir); returns bytes."""
        body = msgpack.packb(doc, use_bin_type=True)
        data = msgpack.packb({"body": body, "sha256": hashlib.sha256(body).hexdigest()},
                             use_bin_type=True)
        tmp = self.directory / f".{FILE}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(data)
