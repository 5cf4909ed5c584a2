"""The checkpoint writer: a queue of captured states and the one thread that writes them.

Captures are copied under a shard's lock and queued here, so pushes wait only for the copy;
the writer thread writes them outside it. Forced and final checkpoints write on the caller's
thread through the same `write`. Disk format and atomicity live in `checkpoint`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .checkpoint import ShardState
from .ckpt_metrics import CheckpointMetrics
from .datadir import DataDir
from .errors import InvalidConfigError

log = logging.getLogger("shardps.ps")

DEFAULT_KEEP = 3
# Copies waiting for the writer per shard; beyond this the oldest periodic one is dropped
# (superseded), so a slow disk costs checkpoints, never memory without bound. The initial one
# (version 0, the base every rollback can reach) and a job's final weights are never dropped.
MAX_QUEUED = 3


@dataclass
class _Due:
    """A captured state waiting for the writer."""

    state: ShardState
    reason: str


class CheckpointWriter:
    """Writes the checkpoints of the shards under `data_dir`.

    Thread-safety: `queue` may be called from any thread, a shard's lock held or not (it
    never blocks on disk). One write lock serialises every write and prune, so a shard
    directory has one writer at a time. `shutdown()` stops the thread after what is queued.
    """

    def __init__(self, data_dir: DataDir, metrics: CheckpointMetrics):
        self._data_dir = data_dir
        self._metrics = metrics
        self._due: dict[tuple[str, int], list[_Due]] = {}
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._timeline: dict[tuple[str, int], int] = {}  # (job, shard) -> last rollback id
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def queue(self, state: ShardState, reason: str) -> None:
        """Hands a captured state to the writer thread (only "periodic" ones are ever dropped)."""
        with self._cond:
            queue = self._due.setdefault((state.job_id, state.index), [])
            queue.append(_Due(state, reason))
            periodic = [i for i, d in enumerate(queue) if d.reason == "periodic"]
            if len(queue) > MAX_QUEUED and periodic:
                dropped = queue.pop(periodic[0])
                self._metrics.written.labels("superseded").inc()
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
            self.write(due.state, due.reason)

    def write(self, state: ShardState, reason: str) -> Path | None:
        """Writes a checkpoint now, on this thread; its path, or None if it failed (logged)
        or belongs to a timeline a rollback abandoned."""
        keep = state.config.checkpoint_keep or DEFAULT_KEEP
        start = time.perf_counter()
        with self._write_lock:
            if state.rollback_id < self._timeline.get((state.job_id, state.index), 0):
                log.info("job %s shard %d: %s checkpoint at version %d skipped: rolled back "
                         "since", state.job_id, state.index, reason, state.version)
                return None
            try:
                directory = self._data_dir.shard_dir(state.job_id, state.index)
                path = checkpoint.write(directory, state, keep)
            except (OSError, InvalidConfigError) as exc:
                self._metrics.written.labels("failed").inc()
                log.error("job %s shard %d: %s checkpoint at version %d failed: %s",
                          state.job_id, state.index, reason, state.version, exc)
                return None
        seconds = time.perf_counter() - start
        self._metrics.written.labels("written").inc()
        self._metrics.seconds.observe(seconds)
        self._metrics.version.labels(state.job_id, str(state.index)).set(state.version)
        self._metrics.timestamp.labels(state.job_id, str(state.index)).set_to_current_time()
        log.info("job %s shard %d: %s checkpoint at version %d written in %.3f s (%s)",
                 state.job_id, state.index, reason, state.version, seconds, path.name)
        return path

    def abandon(self, job_id: str, index: int, rollback_id: int) -> None:
        """A rollback: copies of the shard captured under an older rollback id are never
        written from now on, even if one is already queued."""
        self._timeline[(job_id, index)] = rollback_id

    def drop_newer(self, directory: Path, version: int) -> None:
        """Deletes the directory's checkpoints newer than `version`, between writes."""
        with self._write_lock:
            checkpoint.drop_newer(directory, version)

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until every queued checkpoint is written (tests, rollback, shutdown)."""
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

    def shutdown(self) -> None:
        """Stops the writer thread once the queue is empty."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(60)
