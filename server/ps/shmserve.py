"""The data plane's same-host path on the server (proto/dataplane.py, "shared memory"): one
connection's segment, from SHM_OPEN and SHM_CONFIRM, and the element moves of PUSH_SHM and
PULL_SHM through it. dataserver.py frames the requests; bulk.py does the rest as for PUSH and
PULL."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

import grpc
import torch
from prometheus_client import Gauge

from shardps.proto import dataplane
from shardps.runtime import shm

log = logging.getLogger("shardps.ps")


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


class ShmLink:
    """One connection's segment. `limit()` is the largest capacity to make (bytes); the
    gauges count the segments mapped and their bytes."""

    def __init__(self, limit: Callable[[], int], segments: Gauge, held: Gauge):
        self._limit = limit
        self._segments, self._held = segments, held
        self._offered: shm.Segment | None = None
        self.segment: shm.Segment | None = None

    def open(self, body: bytes) -> bytes:
        """SHM_OPEN: the reply's body (nonce and path), or empty when declined."""
        if len(body) != dataplane.CAPACITY.size:
            raise ShmError(grpc.StatusCode.INVALID_ARGUMENT, "SHM_OPEN takes a u64 capacity")
        (capacity,) = dataplane.CAPACITY.unpack(body)
        self._drop_offered()
        limit = self._limit()
        if not 0 < capacity <= limit:
            log.info("data plane: shared memory of %d bytes declined (at most %d)", capacity, limit)
            return b""
        try:
            self._offered = shm.Segment.create(capacity)
        except OSError as exc:
            log.warning("data plane: no shared-memory segment of %d bytes: %s", capacity, exc)
            return b""
        return self._offered.nonce + self._offered.path.encode()

    def confirm(self, body: bytes) -> None:
        """SHM_CONFIRM: the offered segment becomes the connection's (on a 1) or is dropped."""
        offered, self._offered = self._offered, None
        if offered is None or body not in (b"\0", b"\1"):
            if offered is not None:
                offered.unlink()
                offered.close()
            raise ShmError(grpc.StatusCode.FAILED_PRECONDITION,
                           "SHM_CONFIRM takes one byte, 0 or 1, after an SHM_OPEN that made a segment")
        offered.unlink()
        if body == b"\1":
            self._release()
            self.segment = offered
            self._segments.inc()
            self._held.inc(offered.capacity)
        else:
            offered.close()

    def fitting(self, count: int, dtype: torch.dtype) -> shm.Segment | None:
        """The segment, if there is one and it holds `count` elements of `dtype`."""
        if self.segment is None or not shm.fits(self.segment.capacity, count, dtype):
            return None
        return self.segment

    def require(self, count: int, dtype: torch.dtype) -> shm.Segment:
        """The segment, if it holds `count` elements of `dtype`; else ShmError."""
        if self.segment is None:
            raise ShmError(grpc.StatusCode.FAILED_PRECONDITION, "no shared-memory segment attached")
        if not shm.fits(self.segment.capacity, count, dtype):
            raise ShmError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{count} elements of {dtype} do not fit the segment's "
                           f"{self.segment.capacity} bytes")
        return self.segment

    def close(self) -> None:
        self._drop_offered()
        self._release()

    def _release(self) -> None:
        if self.segment is not None:
            self._segments.dec()
            self._held.dec(self.segment.capacity)
            self.segment.close()
            self.segment = None

    def _drop_offered(self) -> None:
        if self._offered is not None:
            self._offered.unlink()
            self._offered.close()
            self._offered = None


def reader(segment: shm.Segment, grad: torch.Tensor) -> Callable[[int, int], None]:
    """fill(lo, hi): copies elements [lo, hi) of a push from the segment into `grad`."""
    def fill(lo: int, hi: int) -> None:
        grad[lo:hi].copy_(segment.tensor(grad.dtype, hi - lo, lo))
    return fill
