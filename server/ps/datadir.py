"""The server's data dir: the node-id file, one mark file per shard, and where each shard's
checkpoints live (the checkpoint format itself is `checkpoint`'s).

<data_dir>/node_id holds the node id the server registered under; each shard directory holds
`applied.mark`, the shard's latest version, rewritten after every update so that a restart
can count the updates its checkpoint lacks.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from shardps.proto import coordinator_pb2

from . import checkpoint

NODE_ID_FILE = "node_id"
MARK_FILE = "applied.mark"  # the shard's latest version, rewritten after every update


class DataDir:
    """One server's data dir, created if missing.

    Thread-safety: the node id is read and written by the heartbeat thread. Mark files are
    opened by `open_mark` (attach, one caller per shard at a time) and written by push threads
    under their shard's lock; `close` runs at shutdown, after pushes have stopped.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._marks: dict[tuple[str, int], int] = {}  # (job, shard) -> fd of its mark file

    # -- identity ---------------------------------------------------------------------------

    def node_id(self) -> str:
        """The node id this data dir registered under before ("" the first time)."""
        try:
            return (self.path / NODE_ID_FILE).read_text().strip()
        except FileNotFoundError:
            return ""

    def save_node_id(self, node_id: str) -> None:
        """Persists the node id atomically, so a restart registers under the same one."""
        if node_id == self.node_id():
            return
        tmp = self.path / f".{NODE_ID_FILE}.tmp"
        with open(tmp, "w") as f:
            f.write(node_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / NODE_ID_FILE)
        checkpoint.fsync_dir(self.path)

    # -- shard directories ------------------------------------------------------------------

    def shard_dir(self, job_id: str, index: int) -> Path:
        return checkpoint.shard_dir(self.path, job_id, index)

    def shard_dirs(self) -> list[tuple[str, int, Path]]:
        """(job, shard, directory) of every shard directory here."""
        return checkpoint.shard_dirs(self.path)

    def stored(self) -> list[coordinator_pb2.ShardVersion]:
        """Every job shard with a committed checkpoint here, at its newest version."""
        found = []
        for job_id, index, directory in self.shard_dirs():
            newest = checkpoint.committed(directory)
            if newest:
                found.append(coordinator_pb2.ShardVersion(job_id=job_id, shard_index=index,
                                                          version=newest[0][0]))
        return found

    def listing(self, job_id: str = "") -> list[tuple[str, int, int, Path]]:
        """(job, shard, version, path) of every valid checkpoint, newest first per shard."""
        out = []
        for job, index, directory in self.shard_dirs():
            if job_id and job != job_id:
                continue
            valid = set(checkpoint.versions(directory))
            out += [(job, index, v, p) for v, p in checkpoint.committed(directory) if v in valid]
        return out

    # -- mark files -------------------------------------------------------------------------

    def open_mark(self, job_id: str, index: int) -> None:
        """Opens (creating) the shard's mark file for `write_mark`; its directory exists."""
        key = (job_id, index)
        old = self._marks.pop(key, None)
        if old is not None:
            os.close(old)
        self._marks[key] = os.open(self.shard_dir(job_id, index) / MARK_FILE,
                                   os.O_RDWR | os.O_CREAT, 0o644)

    def write_mark(self, job_id: str, index: int, version: int) -> None:
        """Records the shard's latest version (no-op for a shard without an open mark)."""
        fd = self._marks.get((job_id, index))
        if fd is not None:
            # pwrite of 8 bytes, no fsync: survives the process being killed (the page cache
            # does), which is the failure it measures; after a machine crash it may be behind.
            os.pwrite(fd, struct.pack("<q", version), 0)

    def close(self) -> None:
        """Closes the mark files."""
        for fd in self._marks.values():
            os.close(fd)
        self._marks.clear()


def read_mark(directory: Path) -> int | None:
    """The version a shard directory's mark file recorded, None if it has none."""
    try:
        data = (directory / MARK_FILE).read_bytes()
    except FileNotFoundError:
        return None
    return struct.unpack("<q", data[:8])[0] if len(data) >= 8 else None
