"""The server's checkpoint duty: when to write, the writer thread, restore, rollback, resume.

Disk format and atomicity live in `checkpoint`; this module decides when and for whom. A
shard's `on_applied` hook (under the shard's lock) copies the state when a checkpoint is due
and queues it; one writer thread writes it outside the lock, so pushes wait only for the copy.

Every path it touches is derived from validated identifiers and resolved under the data dir
(`checkpoint.shard_dir`); a checkpoint it cannot use is skipped for an older one, and a shard
it cannot restore at all is left out with an error in the log: the server always starts.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shardps.proto import common_pb2, coordinator_pb2, names

from . import checkpoint, paths
from .checkpoint import Expect, ShardState
from .errors import InvalidConfigError
from .shard import Shard

log = logging.getLogger("shardps.ps")

NODE_ID_FILE = "node_id"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
MARK_FILE = "applied.mark"  # the shard's latest version, rewritten after every update
DEFAULT_KEEP = 3
# Copies waiting for the writer per shard; beyond this the oldest periodic one is dropped
# (superseded), so a slow disk costs checkpoints, never memory without bound. The initial one
# (version 0, the base every rollback can reach) is never dropped.
MAX_QUEUED = 3
_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class _Due:
    """A captured state waiting for the writer."""

    state: ShardState
    keep: int
    reason: str


class CheckpointMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.written = Counter("shardps_ps_checkpoints_total",
                               "Checkpoint writes, by result (written, failed, superseded)",
                               ["result"], registry=registry)
        self.seconds = Histogram("shardps_ps_checkpoint_seconds",
                                 "Time to write one checkpoint (outside the shard lock)",
                                 buckets=_SECONDS, registry=registry)
        self.copy_seconds = Histogram("shardps_ps_checkpoint_copy_seconds",
                                      "Time the shard lock is held to copy a checkpoint's state",
                                      buckets=_SECONDS, registry=registry)
        self.version = Gauge("shardps_ps_checkpoint_version",
                             "Version of the newest checkpoint written", ["job", "shard"],
                             registry=registry)
        # Age, the Prometheus way: time() - shardps_ps_checkpoint_timestamp_seconds.
        self.timestamp = Gauge("shardps_ps_checkpoint_timestamp_seconds",
                               "Unix time the newest checkpoint was written", ["job", "shard"],
                               registry=registry)
        self.restores = Counter("shardps_ps_restores_total",
                                "Shards restored from a checkpoint, by kind (startup, "
                                "rollback, resume)", ["kind"], registry=registry)
        self.fallbacks = Counter("shardps_ps_checkpoint_fallbacks_total",
                                 "Unusable checkpoints skipped for an older one (torn, "
                                 "corrupt)", registry=registry)
        self.lost = Counter("shardps_ps_lost_updates_total",
                            "Versions a shard had applied that its restored checkpoint lacks "
                            "(async/ssp: lost; sync: replayed by the workers)", ["job"],
                            registry=registry)


class Checkpointer:
    """Writes, restores and rolls back the shards of one server under `data_dir`.

    Thread-safety: `on_applied` runs on push threads under a shard's lock and only copies
    and queues; the writer thread writes; forced and final checkpoints write on the caller's
    thread. One lock serialises all writes, so a shard directory has one writer at a time.
    `shutdown()` stops the writer after what is queued.
    """

    def __init__(self, data_dir: str | Path, registry: CollectorRegistry | None = None):
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir).resolve()
        self.metrics = CheckpointMetrics(registry or CollectorRegistry())
        self._due: dict[tuple[str, int], list[_Due]] = {}
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._marks: dict[tuple[str, int], int] = {}  # (job, shard) -> fd of its mark file
        self._armed: dict[tuple[str, int], tuple[int, threading.Event, list]] = {}
        self._reports: list[coordinator_pb2.ShardVersion] = []
        self._restoring: set[int] = set()  # ids of shards restore_all made, until attached
        self._timeline: dict[tuple[str, int], int] = {}  # (job, shard) -> last rollback id
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    # -- identity ---------------------------------------------------------------------------

    def node_id(self) -> str:
        """The node id this data dir registered under before ("" the first time, or when the
        file does not hold a valid id: logged, and the server registers as a new node)."""
        try:
            fd = os.open(self.data_dir / NODE_ID_FILE, os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            log.warning("node id file unreadable (%s); registering as a new node",
                        exc.strerror or type(exc).__name__)
            return ""
        with os.fdopen(fd, "rb") as f:
            data = f.read(names.MAX_LEN + 2)
        node_id = data.decode("utf-8", "replace").strip()
        if not names.is_valid(node_id):
            log.warning("node id file holds no valid node id (%s); registering as a new node",
                        names.shown(node_id))
            return ""
        return node_id

    def save_node_id(self, node_id: str) -> None:
        """Persists the node id atomically, so a restart registers under the same one
        (an invalid id is not written: logged)."""
        if not names.is_valid(node_id):
            log.error("node id %s from the coordinator is not a valid id; not saved",
                      names.shown(node_id))
            return
        if node_id == self.node_id():
            return
        tmp = self.data_dir / f".{NODE_ID_FILE}.tmp"
        try:
            tmp.unlink()  # a leftover (or a symlink planted there): never written through
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(node_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.data_dir / NODE_ID_FILE)
        checkpoint.fsync_dir(self.data_dir)

    # -- hooks ------------------------------------------------------------------------------

    def attach(self, shard: Shard) -> None:
        """Starts checkpointing a shard (ShardRegistry.put calls this for every new shard).

        A shard created by InitShard with `resume_from_job` takes that job's checkpoint first.
        A new shard gets a checkpoint of its starting state (the base every rollback can
        reach). Raises InvalidConfigError if a job id is not a valid one or a resume
        checkpoint is missing or does not fit, OSError if its directory cannot be created.
        """
        fresh = id(shard) not in self._restoring
        if fresh and shard.config.resume_from_job:
            self._resume(shard)
        key = (shard.job_id, shard.index)
        directory = self._dir(shard)
        directory.mkdir(parents=True, exist_ok=True)
        if fresh:  # a new InitShard: checkpoints left from an earlier one are another timeline
            with self._write_lock:
                checkpoint.drop_newer(directory, -1)
        old = self._marks.pop(key, None)
        if old is not None:
            os.close(old)
        try:
            self._marks[key] = os.open(directory / MARK_FILE, os.O_RDWR | os.O_CREAT | _NOFOLLOW,
                                       0o644)
        except OSError as exc:  # only the lost-update count after a crash needs it
            log.warning("job %s shard %d: no %s (%s): updates lost in a crash will not be "
                        "counted", shard.job_id, shard.index, MARK_FILE,
                        exc.strerror or type(exc).__name__)
        shard.on_applied = self._on_applied
        if fresh:
            self._queue(shard.capture(), "initial")
        self._restoring.discard(id(shard))
        _write_mark(self._marks[key], shard.version)

    def _on_applied(self, shard: Shard) -> None:
        """Under the shard's lock, after each version change: mark it, copy if due."""
        key = (shard.job_id, shard.index)
        fd = self._marks.get(key)
        if fd is not None:
            _write_mark(fd, shard.version)
        every = shard.config.checkpoint_every_steps
        armed = self._armed.get(key)
        if armed is not None and shard.version >= armed[0]:
            start = time.perf_counter()
            armed[2].append(shard.capture_locked())
            self.metrics.copy_seconds.observe(time.perf_counter() - start)
            del self._armed[key]
            armed[1].set()
        elif every > 0 and shard.version % every == 0:
            start = time.perf_counter()
            state = shard.capture_locked()
            self.metrics.copy_seconds.observe(time.perf_counter() - start)
            self._queue(state, "periodic")

    def _queue(self, state: ShardState, reason: str) -> None:
        keep = state.config.checkpoint_keep or DEFAULT_KEEP
        with self._cond:
            queue = self._due.setdefault((state.job_id, state.index), [])
            queue.append(_Due(state, keep, reason))
            periodic = [i for i, d in enumerate(queue) if d.reason == "periodic"]
            if len(queue) > MAX_QUEUED and periodic:
                dropped = queue.pop(periodic[0])
                self.metrics.written.labels("superseded").inc()
                log.warning("job %s shard %d: checkpoint at version %d dropped: the writer is "
                            "behind", dropped.state.job_id, dropped.state.index,
                            dropped.state.version)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due and not self._stopping:
                    self._cond.wait()
                if not self._due:
                    return
                key = next(iter(self._due))
                due = self._due[key].pop(0)
                if not self._due[key]:
                    del self._due[key]
            self._write(due.state, due.keep, due.reason)

    def _write(self, state: ShardState, keep: int, reason: str) -> Path | None:
        start = time.perf_counter()
        with self._write_lock:
            if state.rollback_id < self._timeline.get((state.job_id, state.index), 0):
                log.info("job %s shard %d: %s checkpoint at version %d skipped: rolled back "
                         "since", state.job_id, state.index, reason, state.version)
                return None
            try:
                directory = self._shard_dir(state.job_id, state.index)
                path = checkpoint.write(directory, state, keep)
            except (OSError, InvalidConfigError) as exc:
                self.metrics.written.labels("failed").inc()
                log.error("job %s shard %d: %s checkpoint at version %d failed: %s",
                          state.job_id, state.index, reason, state.version, exc)
                return None
        seconds = time.perf_counter() - start
        self.metrics.written.labels("written").inc()
        self.metrics.seconds.observe(seconds)
        self.metrics.version.labels(state.job_id, str(state.index)).set(state.version)
        self.metrics.timestamp.labels(state.job_id, str(state.index)).set_to_current_time()
        log.info("job %s shard %d: %s checkpoint at version %d written in %.3f s (%s)",
                 state.job_id, state.index, reason, state.version, seconds, path.name)
        return path

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until every queued checkpoint is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                idle = not self._due
            if idle and self._write_lock.acquire(timeout=0.05):
                self._write_lock.release()
                with self._cond:
                    if not self._due:
                        return True
            time.sleep(0.01)
        return False

    # -- forced and final -------------------------------------------------------------------

    def checkpoint_now(self, shard: Shard, at_version: int = 0,
                       timeout: float = 30.0) -> tuple[int, Path | None]:
        """Writes a checkpoint of `shard` on the caller's thread; returns (version, path).

        With `at_version` above the shard's version (and the job not frozen) it waits up to
        `timeout` s for that version and captures exactly there; otherwise, and when the wait
        times out, it captures the current state.
        """
        key = (shard.job_id, shard.index)
        state = None
        if at_version > shard.version and not shard.frozen:
            box: list[ShardState] = []
            event = threading.Event()
            self._armed[key] = (at_version, event, box)
            if shard.version < at_version or box:  # else it got there before the hook was armed
                event.wait(timeout)
            self._armed.pop(key, None)
            state = box[0] if box else None
        if state is None:
            state = shard.capture()
        return state.version, self._write(state, state.config.checkpoint_keep or DEFAULT_KEEP,
                                          "forced")

    def final_weights(self, shard: Shard) -> None:
        """The shard's job has ended and its final weights are fixed (Shard.settled): queues
        a checkpoint of them, never dropped, so a restart restores the final version."""
        self._queue(shard.capture(), "final-version")

    def final(self, shards: Iterable[Shard]) -> None:
        """Shutdown: writes every shard's current state (after pushes have stopped)."""
        for shard in shards:
            state = shard.capture()
            self._write(state, state.config.checkpoint_keep or DEFAULT_KEEP, "final")

    def shutdown(self) -> None:
        """Stops the writer thread once the queue is empty and closes the mark files."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(60)
        for fd in self._marks.values():
            os.close(fd)
        self._marks.clear()

    # -- restore ----------------------------------------------------------------------------

    def restore_all(self) -> list[Shard]:
        """Server start: every shard in the data dir from its newest valid checkpoint.

        The shards' versions past their checkpoint (read from the mark file) are counted as
        lost and reported to the coordinator at registration (`take_reports`). A shard without
        a usable checkpoint is left out with an error in the log; nothing here raises.
        """
        shards = []
        for job_id, index, directory in checkpoint.shard_dirs(self.data_dir):
            try:
                shard = self._restore(job_id, index, directory)
            except Exception:  # noqa: BLE001  # a checkpoint is input: never stop the server
                log.exception("job %s shard %d: restoring from %s failed; not restored",
                              job_id, index, directory)
                continue
            if shard is not None:
                shards.append(shard)
        return shards

    def _restore(self, job_id: str, index: int, directory: Path) -> Shard | None:
        loaded = checkpoint.load(directory, expect=Expect(job_id, index))
        self.metrics.fallbacks.inc(len(loaded.skipped) if loaded else 0)
        if loaded is None:
            if checkpoint.committed(directory):
                log.error("job %s shard %d: no usable checkpoint in %s; not restored",
                          job_id, index, directory)
            return None
        shard = Shard.from_state(loaded.state)
        self._restoring.add(id(shard))
        marked = _read_mark(directory / MARK_FILE)
        lost = max(0, marked - shard.version) if marked is not None else 0
        self.metrics.restores.labels("startup").inc()
        if lost:
            self.metrics.lost.labels(job_id).inc(lost)
        note = (f"; {len(loaded.skipped)} newer unusable checkpoint(s) skipped"
                if loaded.skipped else "")
        log.warning("job %s shard %d restored from %s at version %d (Adam step %d); the "
                    "shard had reached version %s, so %d update(s) are %s%s", job_id, index,
                    loaded.path.name, shard.version, shard.adam_step,
                    marked if marked is not None else "?", lost,
                    "replayed by the workers" if shard.mode == common_pb2.CONSISTENCY_SYNC
                    else "lost", note)
        self._report(shard, lost)
        return shard

    def stored(self) -> list[coordinator_pb2.ShardVersion]:
        """Every job shard with a committed checkpoint here, at its newest version."""
        found = []
        for job_id, index, directory in checkpoint.shard_dirs(self.data_dir):
            newest = checkpoint.committed(directory)
            if newest:
                found.append(coordinator_pb2.ShardVersion(job_id=job_id, shard_index=index,
                                                          version=newest[0][0]))
        return found

    def listing(self, job_id: str = "") -> list[tuple[str, int, int, Path]]:
        """(job, shard, version, path) of every valid checkpoint, newest first per shard."""
        out = []
        for job, index, directory in checkpoint.shard_dirs(self.data_dir):
            if job_id and job != job_id:
                continue
            valid = set(checkpoint.versions(directory, Expect(job, index)))
            out += [(job, index, v, p) for v, p in checkpoint.committed(directory) if v in valid]
        return out

    def apply_rollbacks(self, shards: Sequence[Shard],
                        views: Iterable[coordinator_pb2.ServerJobView]) -> None:
        """Rolls sync shards back to a coordinator rollback they have not applied yet."""
        by_job = {v.job_id: v for v in views if v.rollback_id}
        for shard in shards:
            view = by_job.get(shard.job_id)
            if view is None or view.rollback_id <= shard.rollback_id or shard.frozen:
                continue
            self.rollback(shard, view.rollback_id, view.rollback_version)

    def rollback(self, shard: Shard, rollback_id: int, version: int) -> None:
        """Loads the shard's checkpoint of `version` (or the newest older one, reported back to
        the coordinator), drops its newer checkpoints and marks the rollback applied."""
        if shard.version == version:
            shard.rollback_id = rollback_id
            log.info("job %s shard %d: rollback %d to version %d: already there", shard.job_id,
                     shard.index, rollback_id, version)
            return
        directory = self._dir(shard)
        self.flush()
        loaded = checkpoint.load(directory, at_most=version,
                                 expect=Expect(shard.job_id, shard.index, shard.config))
        if loaded is None:
            log.error("job %s shard %d: rollback %d to version %d impossible: no checkpoint at "
                      "or before it", shard.job_id, shard.index, rollback_id, version)
            shard.rollback_id = rollback_id
            return
        before = shard.version
        loaded.state.rollback_id = rollback_id
        # From here on, copies of the abandoned timeline (captured before load_state, under
        # an older rollback id) are never written, even if one is already queued.
        self._timeline[(shard.job_id, shard.index)] = rollback_id
        shard.load_state(loaded.state)
        with self._write_lock:
            checkpoint.drop_newer(directory, loaded.state.version)
        fd = self._marks.get((shard.job_id, shard.index))
        if fd is not None:
            _write_mark(fd, shard.version)
        self.metrics.restores.labels("rollback").inc()
        self.metrics.lost.labels(shard.job_id).inc(max(0, before - shard.version))
        log.warning("job %s shard %d: rollback %d: version %d -> %d from %s (the workers "
                    "replay the rounds in between)", shard.job_id, shard.index, rollback_id,
                    before, shard.version, loaded.path.name)
        if shard.version != version:
            self._report(shard, before - shard.version)

    def _resume(self, shard: Shard) -> None:
        config = shard.config
        directory = self._shard_dir(config.resume_from_job, shard.index)
        version = config.resume_version if config.resume_version >= 0 else None
        loaded = checkpoint.load(directory, version=version,
                                 expect=Expect(config.resume_from_job, shard.index))
        if loaded is None:
            raise InvalidConfigError(
                f"no valid checkpoint of job {config.resume_from_job} shard {shard.index}"
                + (f" at version {version}" if version is not None else "") + " on this server")
        old = loaded.state.config
        if (old.offset, old.length, old.layout_fingerprint) != (
                config.offset, config.length, config.layout_fingerprint):
            raise InvalidConfigError(
                f"job {config.resume_from_job} shard {shard.index} holds [{old.offset}, "
                f"{old.offset + old.length}) of layout {old.layout_fingerprint}, not "
                f"[{config.offset}, {config.offset + config.length}) of "
                f"{config.layout_fingerprint}")
        shard.load_state(loaded.state, tables=False)
        shard.rollback_id = 0
        self.metrics.restores.labels("resume").inc()
        log.info("job %s shard %d resumes job %s from %s: version %d, Adam step %d",
                 shard.job_id, shard.index, config.resume_from_job, loaded.path.name,
                 shard.version, shard.adam_step)

    def _report(self, shard: Shard, lost: int) -> None:
        with self._cond:
            self._reports.append(coordinator_pb2.ShardVersion(
                job_id=shard.job_id, shard_index=shard.index, version=shard.version,
                lost_updates=lost))

    def take_reports(self) -> list[coordinator_pb2.ShardVersion]:
        """Restores not yet told to the coordinator (give them back with `put_back` if the
        RPC that carried them failed)."""
        with self._cond:
            reports, self._reports = self._reports, []
        return reports

    def put_back(self, reports: Sequence[coordinator_pb2.ShardVersion]) -> None:
        with self._cond:
            self._reports[:0] = list(reports)

    def _dir(self, shard: Shard) -> Path:
        return self._shard_dir(shard.job_id, shard.index)

    def _shard_dir(self, job_id: str, index: int) -> Path:
        """The shard's directory, resolved under the data dir; InvalidConfigError for a job
        id or index that is not valid or would lead outside it (the message names no path)."""
        try:
            return checkpoint.shard_dir(self.data_dir, job_id, index)
        except paths.PathEscape:
            raise InvalidConfigError(f"job {job_id} shard {index}: its directory resolves "
                                     "outside the data dir") from None
        except ValueError as exc:  # names.InvalidName included
            raise InvalidConfigError(str(exc)) from None


def _write_mark(fd: int, version: int) -> None:
    # pwrite of 8 bytes, no fsync: survives the process being killed (the page cache does),
    # which is the failure it measures; after a machine crash it may be behind.
    os.pwrite(fd, struct.pack("<q", version), 0)


def _read_mark(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        data = os.read(fd, 8)
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack("<q", data)[0] if len(data) == 8 else None


def is_sync(shard: Shard) -> bool:
    return shard.mode == common_pb2.CONSISTENCY_SYNC
