"""Shared-memory segments for the data plane's same-host path (proto/dataplane.py, "shared
memory"): a server creates one per connection in /dev/shm, the client on the same host maps
it, and a push's elements or a pull's reply go through it instead of the loopback socket, which
only carries the frames.

A segment is a file in SHM_DIR, mode 0600 (only the server's user, or root, can map it),
reserved in full with posix_fallocate when it is made, so a full tmpfs is a clean refusal and
never a SIGBUS mid-copy. It starts with a header page whose first NONCE_BYTES are random
bytes the server also sends in its reply: a client that maps the file and finds them has
shown it is on the server's host and sees its files. The file is unlinked as soon as the
client has answered (mapped or not), so it lives on only in the two mappings; a server killed
in the moment between is the one way to leave a file behind, which `sweep` removes at the next
start (the name carries the creating process's pid).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets

import torch

from shardps.runtime import daemon

SHM_DIR = "/dev/shm"
PREFIX = "shardps-"
NONCE_BYTES = 16
HEADER_BYTES = mmap.PAGESIZE  # the nonce's page; the data starts page-aligned after it
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-[0-9a-f]+$")


class Segment:
    """A mapped segment of `capacity` data bytes. Views into it are short-lived tensors: a
    view kept alive past `close` keeps the mapping alive until it is dropped."""

    def __init__(self, fd: int, capacity: int, path: str, nonce: bytes):
        self.path, self.nonce, self.capacity = path, nonce, capacity
        self._linked = True
        try:
            self._map: mmap.mmap | None = mmap.mmap(fd, HEADER_BYTES + capacity)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, capacity: int) -> Segment:
        """A new segment (the server's side). Raises OSError (ENOSPC on a full tmpfs)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{nonce.hex()[:16]}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, HEADER_BYTES + capacity)
            os.pwrite(fd, nonce, 0)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(fd, capacity, path, nonce)

    @classmethod
    def attach(cls, path: str, nonce: bytes, capacity: int) -> Segment:
        """Maps a segment the server made (the client's side); raises OSError if the file is
        not there, is not the size announced, or does not start with `nonce`."""
        if os.path.dirname(path) != SHM_DIR or not _NAME.match(os.path.basename(path)):
            raise OSError(f"not a shardps segment: {path!r}")
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != HEADER_BYTES + capacity or os.pread(fd, NONCE_BYTES, 0) != nonce:
                raise OSError(f"{path} is not the segment the server announced")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, capacity, path, nonce)

    def unlink(self) -> None:
        """Removes the file (the mappings stay); idempotent."""
        if self._linked:
            self._linked = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def tensor(self, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
        """`count` elements of `dtype` starting `offset` elements into the data (in bounds:
        the caller checks against `capacity`)."""
        assert self._map is not None, "segment closed"
        return torch.frombuffer(self._map, dtype=dtype, count=count,
                                offset=HEADER_BYTES + offset * dtype.itemsize)

    def close(self) -> None:
        """Unmaps, unless views are still alive (their mapping then goes with the last)."""
        mapping, self._map = self._map, None
        if mapping is not None:
            with contextlib.suppress(BufferError):
                mapping.close()


def fits(capacity: int, count: int, dtype: torch.dtype, offset: int = 0) -> bool:
    """Whether elements [offset, offset + count) of `dtype` lie within `capacity` bytes."""
    return 0 <= offset and 0 <= count and (offset + count) * dtype.itemsize <= capacity


def sweep() -> int:
    """Removes segments left by shardps processes that are gone (a server killed between
    making a segment and unlinking it); returns how many."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        match = _NAME.match(name)
        if match is None or daemon.pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, name))
            removed += 1
    return removed

