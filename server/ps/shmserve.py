"""The data plane's same-host path on the server (proto/dataplane.py, "shared memory"): one
connection's segment, from SHM_OPEN and SHM_CONFIRM, and the element moves of PUSH_SHM and
PULL_SHM through it. dataserver.py frames the requests; bulk.py does the rest as for PUSH and
PULL."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable

import grpc
import torch
from prometheus_client import Gauge

from shardps.proto import dataplane
from shardps.runtime import shm

log = logging.getLogger("shardps.ps")

BUDGET_SHARDS = 4  # a server's segments may hold this many times its shards' fp32 bytes


class ShmError(Exception):
    """A shared-memory request that cannot be served: answered with `code`, then the
    connection is closed (the client then reconnects without shared memory in step)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def offered(conn: socket.socket) -> bool:
    """Whether both ends of `conn` are loopback addresses (same host, same network
    namespace): the only connections offered shared memory."""
    try:
        ends = (conn.getsockname()[0], conn.getpeername()[0])
        return all(ipaddress.ip_address(host.split("%")[0]).is_loopback for host in ends)
    except (OSError, ValueError):
        return False


class Budget:
    """The bytes of /dev/shm a server's segments may hold at once, offered or mapped:
    `total()` read at each take (BUDGET_SHARDS x the fp32 bytes of the shards it holds), so
    connections that ask for segment after segment are declined once it is spent, and never
    fill the host's memory. `held` mirrors what is taken. Thread-safe."""

    def __init__(self, total: Callable[[], int], held: Gauge):
        self._total, self._gauge = total, held
        self._held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        total = self._total()  # reads the shard registry: outside this lock
        with self._lock:
            if self._held + nbytes > total:
                return False
            self._held += nbytes
        self._gauge.inc(nbytes)
        return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes
        self._gauge.dec(nbytes)


class ShmLink:
    """One connection's segment. `limit()` is the largest capacity to make (bytes), within
    the server's `budget`; the `mapped` gauge counts the segments in use."""

    def __init__(self, limit: Callable[[], int], budget: Budget, mapped: Gauge):
        self._limit, self._budget, self._mapped = limit, budget, mapped
        self._offered: shm.Segment | None = None
        self.segment: shm.Segment | None = None

    def open(self, body: bytes) -> bytes:
        """SHM_OPEN: the reply's body (nonce and path), or empty when declined."""
        if len(body) != dataplane.CAPACITY.size:
            raise ShmError(grpc.StatusCode.INVALID_ARGUMENT, "SHM_OPEN takes a u64 capacity")
        (capacity,) = dataplane.CAPACITY.unpack(body)
        self._drop_offered()
        limit = self._limit()
        if not 0 < capacity <= limit or not self._budget.take(capacity):
            log.info("data plane: shared memory of %d bytes declined (at most %d, within the "
                     "server's budget)", capacity, limit)
            return b""
        try:
            self._offered = shm.Segment.create(capacity)
        except OSError as exc:
            self._budget.give(capacity)
            log.warning("data plane: no shared-memory segment of %d bytes: %s", capacity, exc)
            return b""
        return self._offered.nonce + self._offered.path.encode()

    def confirm(self, body: bytes) -> None:
        """SHM_CONFIRM: the offered segment becomes the connection's (on a 1) or is dropped."""
        offered, self._offered = self._offered, None
        if offered is None or body not in (b"\0", b"\1"):
            self._free(offered)
            raise ShmError(grpc.StatusCode.FAILED_PRECONDITION,
                           "SHM_CONFIRM takes one byte, 0 or 1, after an SHM_OPEN that made a segment")
        offered.unlink()
        if body == b"\1":
            self._release()
            self.segment = offered
            self._mapped.inc()
        else:
            self._free(offered)

    def fitting(self, count: int, dtype: torch.dtype) -> shm.Segment | None:
        """The segment, if there is one and it holds `count` elements of `dtype`."""
        if self.segment is None or not shm.fits(self.segment.capacity, count, dtype):
            return None
        return self.segment

    def require(self, count: int, dtype: torch.dtype) -> shm.Segment:
        """The segment, if it holds `count` elements of `dtype`; else ShmError."""
        if self.segment is None:
            raise ShmError(grpc.StatusCode.FAILED_PRECONDITION, "no shared-memory segment attached")
        segment = self.fitting(count, dtype)
        if segment is None:
            raise ShmError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{count} elements of {dtype} do not fit the segment's "
                           f"{self.segment.capacity} bytes")
        return segment

    def close(self) -> None:
        self._drop_offered()
        self._release()

    def _release(self) -> None:
        if self.segment is not None:
            self._mapped.dec()
            self._free(self.segment)
            self.segment = None

    def _drop_offered(self) -> None:
        self._free(self._offered)
        self._offered = None

    def _free(self, segment: shm.Segment | None) -> None:
        """Unlinks (if not yet), unmaps and gives its bytes back to the budget."""
        if segment is not None:
            segment.unlink()
            segment.close()
            self._budget.give(segment.capacity)


def reader(segment: shm.Segment, grad: torch.Tensor) -> Callable[[int, int], None]:
    """fill(lo, hi): copies elements [lo, hi) of a push from the segment into `grad`."""
    def fill(lo: int, hi: int) -> None:
        grad[lo:hi].copy_(segment.tensor(grad.dtype, hi - lo, lo))
    return fill
