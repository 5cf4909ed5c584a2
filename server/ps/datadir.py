"""The server's data dir: the node-id file, one mark file per shard, and where each shard's
checkpoints live (the checkpoint format itself is `checkpoint`'s).

<data_dir>/node_id holds the node id the server registered under; each shard directory holds
`applied.mark`, the shard's latest version, rewritten after every update so that a restart
can count the updates its checkpoint lacks. Every path is derived from validated identifiers
and resolved under the data dir (`checkpoint.shard_dir`); files are opened without following
symlinks.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

from shardps.proto import coordinator_pb2, names

from . import checkpoint, paths
from .checkpoint import Expect
from .errors import InvalidConfigError

log = logging.getLogger("shardps.ps")

NODE_ID_FILE = "node_id"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
MARK_FILE = "applied.mark"  # the shard's latest version, rewritten after every update


class DataDir:
    """One server's data dir, created if missing.

    Thread-safety: the node id is read and written by the heartbeat thread. Mark files are
    opened by `open_mark` (attach, one caller per shard at a time) and written by push threads
    under their shard's lock; `close` runs at shutdown, after pushes have stopped.
    """

    def __init__(self, path: str | Path):
        Path(path).mkdir(parents=True, exist_ok=True)
        self.path = Path(path).resolve()
        self._marks: dict[tuple[str, int], int] = {}  # (job, shard) -> fd of its mark file

    # -- identity ---------------------------------------------------------------------------

    def node_id(self) -> str:
        """The node id this data dir registered under before ("" the first time, or when the
        file does not hold a valid id: logged, and the server registers as a new node)."""
        try:
            fd = os.open(self.path / NODE_ID_FILE, os.O_RDONLY | _NOFOLLOW)
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
        tmp = self.path / f".{NODE_ID_FILE}.tmp"
        try:
            tmp.unlink()  # a leftover (or a symlink planted there): never written through
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(node_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / NODE_ID_FILE)
        checkpoint.fsync_dir(self.path)

    # -- shard directories ------------------------------------------------------------------

    def shard_dir(self, job_id: str, index: int) -> Path:
        """The shard's directory, resolved under the data dir; InvalidConfigError for a job
        id or index that is not valid or would lead outside it (the message names no path)."""
        try:
            return checkpoint.shard_dir(self.path, job_id, index)
        except paths.PathEscape:
            raise InvalidConfigError(f"job {job_id} shard {index}: its directory resolves "
                                     "outside the data dir") from None
        except ValueError as exc:  # names.InvalidName included
            raise InvalidConfigError(str(exc)) from None

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
            valid = set(checkpoint.versions(directory, Expect(job, index)))
            out += [(job, index, v, p) for v, p in checkpoint.committed(directory) if v in valid]
        return out

    # -- mark files -------------------------------------------------------------------------

    def open_mark(self, job_id: str, index: int) -> None:
        """Opens (creating) the shard's mark file for `write_mark`; its directory exists.
        If it cannot, the shard goes without (logged)."""
        key = (job_id, index)
        old = self._marks.pop(key, None)
        if old is not None:
            os.close(old)
        try:
            self._marks[key] = os.open(self.shard_dir(job_id, index) / MARK_FILE,
                                       os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as exc:  # only the lost-update count after a crash needs it
            log.warning("job %s shard %d: no %s (%s): updates lost in a crash will not be "
                        "counted", job_id, index, MARK_FILE, exc.strerror or type(exc).__name__)

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
        fd = os.open(directory / MARK_FILE, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        data = os.read(fd, 8)
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack("<q", data)[0] if len(data) == 8 else None
