"""Keeps the coordinator's state dir in step with its tables: loads it at start, writes it
when the tables' structure changed (or, lazily, when progress is unsaved), outside the lock
the tables are used under."""

from __future__ import annotations

import logging
import threading
import time

from .jobs import JobTable
from .membership import Membership
from .metrics import CoordinatorMetrics
from .state import StateFile, dump, restore, structure

log = logging.getLogger(__name__)


class StateKeeper:
    """The state dir of one coordinator (docs/architecture.md, "Failures").

    `load` and `capture` are called under the servicer's lock, the lock its Membership and
    JobTable are used under; `flush` without it (it has a lock of its own), so that a slow
    write (fsync) never holds up heartbeats. An RPC captures under the servicer's lock and
    flushes before it replies: what it changed, and everything it saw, is then on disk.

    Args:
        directory: the state dir.
        membership, jobs: the tables it saves and restores.
        metrics: where writes, their sizes and restores are counted.
    """

    def __init__(self, directory: str, membership: Membership, jobs: JobTable,
                 metrics: CoordinatorMetrics):
        self._file = StateFile(directory)
        self._membership = membership
        self._jobs = jobs
        self._metrics = metrics
        self._saved: tuple | None = None  # structure() of the latest capture
        self._dump_cache: dict[str, tuple[tuple, dict]] = {}
        self.dirty = False  # progress recorded since the last capture
        self._pending: tuple[int, dict] = (0, {})  # the latest capture: (sequence, document)
        self._written = 0  # sequence of the capture on disk
        self._write_lock = threading.Lock()

    def load(self) -> None:
        """Loads a saved state into the (empty) tables, if there is one.

        Raises:
            StateError: the state dir holds a state that cannot be loaded.
        """
        doc = self._file.load()
        if doc is None:
            log.debug("no saved state in %s: starting empty", self._file.directory)
            return
        restore(doc, self._membership, self._jobs, time.monotonic(), time.time())
        self._saved = structure(self._membership, self._jobs)
        self._metrics.state_restores.inc()
        active = [j for j in self._jobs.jobs() if not j.final]
        log.warning("restored state from %s (saved %.1f s ago): %d nodes, %d jobs (%d not "
                    "ended); nodes have one lease to heartbeat again", self._file.path,
                    time.time() - doc.get("saved_unix", time.time()),
                    len(self._membership.nodes()), len(self._jobs.jobs()), len(active))

    def capture(self, lazy: bool = False) -> int:
        """Snapshots the tables if their structure changed, or (lazy) if progress is
        unsaved; returns the sequence `flush` must reach (the latest capture's)."""
        now_structure = structure(self._membership, self._jobs)
        if now_structure != self._saved or (lazy and self.dirty):
            doc = dump(self._membership, self._jobs, time.monotonic(), time.time(),
                       self._dump_cache)
            self._pending = (self._pending[0] + 1, doc)
            self._saved, self.dirty = now_structure, False
        return self._pending[0]

    def flush(self, upto: int) -> None:
        """Returns once capture `upto` (or a later one) is on disk, writing the latest if
        needed. A failed write is logged and counted, never raised; the next flush tries
        again."""
        if self._written >= upto:
            return
        with self._write_lock:
            seq, doc = self._pending
            if self._written >= upto:
                return
            try:
                size = self._file.save(doc)
            except OSError as exc:
                self._metrics.state_writes.labels("failed").inc()
                log.error("writing the state to %s failed: %s", self._file.path, exc)
                return
            self._written = seq
            self._metrics.state_writes.labels("written").inc()
            self._metrics.state_bytes.set(size)
