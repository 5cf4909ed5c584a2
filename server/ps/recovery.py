"""Recovery from checkpoints: shards restored at server start, sync rollbacks ordered by the
coordinator, and new jobs that resume an old job's checkpoint.

Every restore that leaves a shard short of the version it had reached is counted (lost
updates) and queued for the coordinator (`RestoreReports`). A checkpoint is input: one it
cannot use is skipped for an older one, and a shard it cannot restore at all is left out with
an error in the log: the server always starts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from shardps.proto import common_pb2, coordinator_pb2, names

from . import checkpoint
from .checkpoint import Expect
from .ckpt_metrics import CheckpointMetrics
from .ckpt_writer import CheckpointWriter
from .datadir import DataDir, read_mark
from .errors import InvalidConfigError
from .reports import RestoreReports
from .shard import Shard

log = logging.getLogger("shardps.ps")


class Recovery:
    """Loads checkpoints of one data dir into shards.

    Thread-safety: `restore_all` runs once before the server serves; rollbacks run on the
    heartbeat thread, a resume on the InitShard thread that attaches the shard. The writer's
    lock orders their deletions against writes; each shard's lock guards its own load.
    """

    def __init__(self, data_dir: DataDir, writer: CheckpointWriter, metrics: CheckpointMetrics,
                 reports: RestoreReports):
        self._data_dir = data_dir
        self._writer = writer
        self._metrics = metrics
        self._reports = reports

    def restore_all(self) -> list[Shard]:
        """Server start: every shard in the data dir from its newest valid checkpoint.

        The shards' versions past their checkpoint (read from the mark file) are counted as
        lost and reported to the coordinator at registration. The shards come back with
        `restored` set, so attaching them keeps their checkpoints. A shard without a usable
        checkpoint is left out with an error in the log; nothing here raises.
        """
        shards = []
        for job_id, index, directory in self._data_dir.shard_dirs():
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
        self._metrics.fallbacks.inc(len(loaded.skipped) if loaded else 0)
        if loaded is None:
            if checkpoint.committed(directory):
                log.error("job %s shard %d: no usable checkpoint in %s; not restored",
                          job_id, index, directory)
            return None
        shard = Shard.from_state(loaded.state)
        marked = read_mark(directory)
        lost = max(0, marked - shard.version) if marked is not None else 0
        self._metrics.restores.labels("startup").inc()
        if lost:
            self._metrics.lost.labels(job_id).inc(lost)
        note = (f"; {len(loaded.skipped)} newer unusable checkpoint(s) skipped"
                if loaded.skipped else "")
        log.warning("job %s shard %d restored from %s at version %d (Adam step %d); the "
                    "shard had reached version %s, so %d update(s) are %s%s", job_id, index,
                    loaded.path.name, shard.version, shard.adam_step,
                    marked if marked is not None else "?", lost,
                    "replayed by the workers" if shard.mode == common_pb2.CONSISTENCY_SYNC
                    else "lost", note)
        self._reports.add(shard.job_id, shard.index, shard.version, lost)
        return shard

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
        the coordinator), drops its newer checkpoints and marks the rollback applied.

        A shard already at `version` is left as it is, unless it has a dynamic table: reads
        change those (sightings counted, rows created or evicted by a pull of the open round),
        and the workers' replayed pulls would count their sightings again, so it takes its
        checkpoint of exactly `version` when it has one."""
        directory = self._data_dir.shard_dir(shard.job_id, shard.index)
        expect = Expect(shard.job_id, shard.index, shard.config)
        if shard.version == version:
            loaded = None
            if any(t.num_embeddings == 0 for t in shard.config.tables):
                self._writer.flush()
                loaded = checkpoint.load(directory, version=version, expect=expect)
            if loaded is None:
                shard.rollback_id = rollback_id
                log.info("job %s shard %d: rollback %d to version %d: already there",
                         shard.job_id, shard.index, rollback_id, version)
                return
        else:
            self._writer.flush()
            loaded = checkpoint.load(directory, at_most=version, expect=expect)
        if loaded is None:
            log.error("job %s shard %d: rollback %d to version %d impossible: no checkpoint at "
                      "or before it", shard.job_id, shard.index, rollback_id, version)
            shard.rollback_id = rollback_id
            return
        before = shard.version
        loaded.state.rollback_id = rollback_id
        # From here on, copies of the abandoned timeline (captured before load_state, under
        # an older rollback id) are never written, even if one is already queued.
        self._writer.abandon(shard.job_id, shard.index, rollback_id)
        shard.load_state(loaded.state)
        self._writer.drop_newer(directory, loaded.state.version)
        self._data_dir.write_mark(shard.job_id, shard.index, shard.version)
        self._metrics.restores.labels("rollback").inc()
        self._metrics.lost.labels(shard.job_id).inc(max(0, before - shard.version))
        log.warning("job %s shard %d: rollback %d: version %d -> %d from %s (the workers "
                    "replay the rounds in between)", shard.job_id, shard.index, rollback_id,
                    before, shard.version, loaded.path.name)
        if shard.version != version:
            self._reports.add(shard.job_id, shard.index, shard.version, before - shard.version)

    def resume(self, shard: Shard) -> None:
        """A new shard of a job created with `resume_from_job` takes that job's checkpoint
        (weights, Adam state, version; not its worker tables).

        Raises:
            InvalidConfigError: the job id is not a valid one, or the checkpoint is missing or
                covers another range or layout.
        """
        config = shard.config
        directory = self._data_dir.shard_dir(config.resume_from_job, shard.index)
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
                f"{old.offset + old.length}) of layout {names.shown(old.layout_fingerprint)}, "
                f"not [{config.offset}, {config.offset + config.length}) of layout "
                f"{names.shown(config.layout_fingerprint)}")
        shard.load_state(loaded.state, membership=False)
        shard.rollback_id = 0
        self._metrics.restores.labels("resume").inc()
        log.info("job %s shard %d resumes job %s from %s: version %d, Adam step %d",
                 shard.job_id, shard.index, config.resume_from_job, loaded.path.name,
                 shard.version, shard.adam_step)
