"""The data plane's same-host path on the client (proto/dataplane.py, "shared memory"): one
connection's segment, asked for (SHM_OPEN, SHM_CONFIRM) when a request first needs one or a
larger one, and the moves of a push's elements into it and a pull's out of it."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

import grpc
import torch

from shardps.proto.dataplane import (
    CAPACITY,
    LANDED,
    ON_SOCKET,
    SHM_CONFIRM,
    SHM_OPEN,
    DataPlaneError,
    recv_exact,
)
from shardps.psclient.transport import PullWatch
from shardps.runtime import shm

log = logging.getLogger("shardps.psclient")

Exchange = Callable[[int, bytes, float], bytes]  # (kind, body, timeout) -> the reply's body
Lengths = dict[tuple[str, int], int]  # (job, shard index) -> elements, as last seen


class ClientShm:
    """One connection's segment. `exchange` sends a request on the connection and reads its
    reply (raising DataPlaneError as every call does). Used by the connection's thread."""

    def __init__(self, exchange: Exchange):
        self._exchange = exchange
        self.segment: shm.Segment | None = None
        self._off = False  # declined, or a segment could not be mapped: the socket from now on

    def ensure(self, nbytes: int, timeout: float) -> shm.Segment | None:
        """A segment of at least `nbytes`, asked for if need be; None where there is none."""
        segment = self.segment
        if segment is not None and segment.capacity >= nbytes:
            return segment
        if self._off or nbytes <= 0:
            return None
        capacity = max(nbytes, segment.capacity if segment is not None else 0)
        reply = self._exchange(SHM_OPEN, CAPACITY.pack(capacity), timeout)
        if len(reply) <= shm.NONCE_BYTES:  # not offered, or no room: no more asking
            self._off = True
            return None
        nonce, path = reply[: shm.NONCE_BYTES], reply[shm.NONCE_BYTES :].decode("utf-8", "replace")
        try:
            fresh = shm.Segment.attach(path, nonce, capacity)
        except OSError as exc:
            log.info("data plane: not mapping the server's segment (%s); using the socket", exc)
            self._off = True
            self._exchange(SHM_CONFIRM, b"\0", timeout)
            return None
        try:
            self._exchange(SHM_CONFIRM, b"\1", timeout)
        except BaseException:
            fresh.close()
            raise
        if segment is not None:
            segment.close()
        self.segment = fresh
        return fresh

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None


def loopback(sock: socket.socket) -> bool:
    """Whether `sock` is connected to a loopback address (the only peers that may offer
    shared memory: the server checks the same, this spares the others the question)."""
    try:
        return ipaddress.ip_address(sock.getpeername()[0].split("%")[0]).is_loopback
    except (OSError, ValueError):
        return False


def land(sock: socket.socket, segment: shm.Segment, dest: torch.Tensor, dtype: torch.dtype,
         address: str, watch: PullWatch | None) -> bool:
    """Reads a PULL_SHM reply's LANDED frames, copying (and casting) each range from the
    segment into `dest` as it lands; False when the server sends the elements on the socket
    instead (ON_SOCKET), which the caller then reads."""
    head = bytearray(LANDED.size)
    done, length = 0, dest.numel()
    while done < length:
        recv_exact(sock, memoryview(head))
        (landed,) = LANDED.unpack(head)
        if landed == ON_SOCKET and done == 0:
            return False
        if not done < landed <= length or not shm.fits(segment.capacity, landed, dtype):
            raise DataPlaneError(grpc.StatusCode.INTERNAL, f"data plane {address}: "
                                 f"{landed} elements landed after {done} of {length}")
        dest[done:landed].copy_(segment.tensor(dtype, landed - done, done))
        done = landed
        if watch is not None:
            watch.received(done)
    return True
