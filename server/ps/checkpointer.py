"""The server's checkpoint duty: when to checkpoint which shard, over the data dir, the
writer and recovery.

A shard's `on_applied` hook (under the shard's lock) marks the new version and, when a
periodic checkpoint is due, copies the state and queues it for the writer thread. Forced
checkpoints (the Checkpoint RPC) wait for their version through the shard's own forced-capture
handshake (`capture`) and write on the caller's thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from shardps.proto import coordinator_pb2

from .ckpt_metrics import CheckpointMetrics
from .ckpt_writer import CheckpointWriter
from .datadir import DataDir
from .recovery import Recovery
from .reports import RestoreReports
from .shard import Shard

log = logging.getLogger("shardps.ps")


class Checkpointer:
    """Writes, restores and rolls back the shards of one server under `data_dir`.

    Thread-safety: `on_applied` runs on push threads under a shard's lock and only marks,
    copies and queues; the writer thread writes; forced and final checkpoints write on the
    caller's thread. The writer serialises all writes, so a shard directory has one writer
    at a time. `shutdown()` stops the writer after what is queued.

    Attributes:
        metrics: the checkpoint metrics, on the registry given (or a private one).
        writer, recovery: the writer thread (`writer.flush()` waits for the queue) and the
            restores, rollbacks and resumes.
    """

    def __init__(self, data_dir: str | Path, registry: CollectorRegistry | None = None):
        self.data_dir = DataDir(data_dir)
        self.metrics = CheckpointMetrics(registry or CollectorRegistry())
        self.reports = RestoreReports()
        self.writer = CheckpointWriter(self.data_dir, self.metrics)
        self.recovery = Recovery(self.data_dir, self.writer, self.metrics, self.reports)

    def attach(self, shard: Shard) -> None:
        """Starts checkpointing a shard (ShardRegistry.put calls this for every new shard).

        A shard created by InitShard with `resume_from_job` takes that job's checkpoint first.
        A new shard gets a checkpoint of its starting state (the base every rollback can
        reach); a shard restored at startup keeps the checkpoints it has. Raises
        InvalidConfigError if a job id is not a valid one or a resume checkpoint is missing or
        does not fit, OSError if its directory cannot be created.
        """
        fresh = not shard.restored
        if fresh and shard.config.resume_from_job:
            self.recovery.resume(shard)
        directory = self.data_dir.shard_dir(shard.job_id, shard.index)
        directory.mkdir(parents=True, exist_ok=True)
        if fresh:  # a new InitShard: checkpoints left from an earlier one are another timeline
            self.writer.drop_newer(directory, -1)
        self.data_dir.open_mark(shard.job_id, shard.index)
        shard.on_applied = self._on_applied
        shard.rows.on_set(lambda: self._on_rows_set(shard))
        if fresh:
            self.writer.queue(shard.capture(), "initial")
        self.data_dir.write_mark(shard.job_id, shard.index, shard.version)

    def _on_applied(self, shard: Shard, forced: bool) -> None:
        """Under the shard's lock, after each version change: mark it; copy it if a periodic
        checkpoint is due and no forced capture was just taken there."""
        self.data_dir.write_mark(shard.job_id, shard.index, shard.version)
        every = shard.config.checkpoint_every_steps
        if not forced and every > 0 and shard.version % every == 0:
            start = time.perf_counter()
            state = shard.capture_locked()
            self.metrics.copy_seconds.observe(time.perf_counter() - start)
            self.writer.queue(state, "periodic")

    def _on_rows_set(self, shard: Shard) -> None:
        """Under the shard's lock, once InitRows has seeded every table (version 0): a new
        base checkpoint, never dropped, so a rollback to version 0 finds the seeded rows."""
        self.writer.queue(shard.capture_locked(), "initial")

    def checkpoint_now(self, shard: Shard, at_version: int = 0,
                       timeout: float = 30.0) -> tuple[int, Path | None]:
        """Writes a checkpoint of `shard` on the caller's thread; returns (version, path).

        With `at_version` above the shard's version (and the job not frozen) it waits up to
        `timeout` s for that version and captures exactly there; otherwise, and when the wait
        times out, it captures the current state. The path is None if the write failed.
        """
        state, copy_seconds = shard.capture_at(at_version, timeout)
        self.metrics.copy_seconds.observe(copy_seconds)
        return state.version, self.writer.write(state, "forced")

    def final_weights(self, shard: Shard) -> None:
        """The shard's job has ended and its final weights are fixed (Shard.settled): queues
        a checkpoint of them, never dropped, so a restart restores the final version."""
        self.writer.queue(shard.capture(), "final-version")

    def final(self, shards: Iterable[Shard]) -> None:
        """Shutdown: writes every shard's current state (after pushes have stopped)."""
        for shard in shards:
            self.writer.write(shard.capture(), "final")

    def shutdown(self) -> None:
        """Stops the writer thread once the queue is empty and closes the mark files."""
        self.writer.shutdown()
        self.data_dir.close()

    # -- what the daemon and the heartbeat ask for --------------------------------------------

    def node_id(self) -> str:
        """The node id this data dir registered under before ("" the first time)."""
        return self.data_dir.node_id()

    def save_node_id(self, node_id: str) -> None:
        self.data_dir.save_node_id(node_id)

    def stored(self) -> list[coordinator_pb2.ShardVersion]:
        """Every job shard with a committed checkpoint here, at its newest version."""
        return self.data_dir.stored()

    def listing(self, job_id: str = "") -> list[tuple[str, int, int, Path]]:
        """(job, shard, version, path) of every valid checkpoint, newest first per shard."""
        return self.data_dir.listing(job_id)

    def restore_all(self) -> list[Shard]:
        """Server start: every shard in the data dir (see Recovery.restore_all)."""
        return self.recovery.restore_all()

    def apply_rollbacks(self, shards: Sequence[Shard],
                        views: Iterable[coordinator_pb2.ServerJobView]) -> None:
        self.recovery.apply_rollbacks(shards, views)

    def take_reports(self) -> list[coordinator_pb2.ShardVersion]:
        """Restores not yet told to the coordinator (see RestoreReports.take)."""
        return self.reports.take()

    def put_back(self, reports: Sequence[coordinator_pb2.ShardVersion]) -> None:
        self.reports.put_back(reports)
