"""One direction of an emulated link, as a pure model with time passed in: packets offered to
it leave after a serialization time at `rate`, a propagation delay with jitter, or are lost at
random (seeded), dropped while the link is cut, or dropped when its queue is full. The relay of
bench/tunlink.py runs two of these; tests/unit/test_linkmodel.py checks it without sockets.

Packets leave in the order they came (jitter never reorders, as netem's with a rate does not),
so the queue is a FIFO of (due time, packet) and the next due time is its head's.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque

# A rate-limited direction drops what would wait longer than this for the wire (a router's
# buffer; bench/netns.py gives tbf the same "latency 100ms").
QUEUE_S = 0.1
# An unlimited direction (no rate) drops beyond this many queued bytes: 50 ms of 5 Gbit/s in
# flight is 31 MB, so only a stalled relay reaches it.
MAX_QUEUED_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one direction does to a packet. Units in the names; 0 means none."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0  # uniform in [-jitter, +jitter] around delay_ms, never below 0
    loss: float = 0.0  # probability in [0, 1) that a packet is lost
    rate_bits: int = 0  # bits per second on the wire; 0 = unlimited

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if not 0 <= value <= 60_000:
                raise ValueError(f"{name} {value}: expected 0 to 60000 ms")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss {self.loss}: expected a probability in [0, 1)")
        if self.rate_bits < 0:
            raise ValueError(f"rate_bits {self.rate_bits}: expected >= 0 (0 = unlimited)")


@dataclasses.dataclass
class Counters:
    """Packets and bytes through one direction, by fate."""

    offered: int = 0
    offered_bytes: int = 0
    delivered: int = 0
    delivered_bytes: int = 0
    lost: int = 0  # the random loss
    cut: int = 0  # dropped while cut (arriving, or queued when the cut came)
    overflow: int = 0  # the queue was full
    write_errors: int = 0  # the far device refused the packet (e.g. it is down)


class Direction:
    """One direction's queue and fate of each packet. Not thread-safe: the relay's loop owns it."""

    def __init__(self, spec: Spec, seed: int):
        self.spec = spec
        self.counters = Counters()
        self.is_cut = False
        self._random = random.Random(seed)
        self._queue: deque[tuple[float, bytes]] = deque()
        self._queued_bytes = 0
        self._wire_free_at = 0.0  # when the last accepted packet has left the sender
        self._last_due = 0.0

    def offer(self, packet: bytes, now: float) -> None:
        """A packet read from the sending side at time now (seconds, monotonic)."""
        c, spec = self.counters, self.spec
        c.offered += 1
        c.offered_bytes += len(packet)
        if self.is_cut:
            c.cut += 1
            return
        if spec.loss and self._random.random() < spec.loss:
            c.lost += 1
            return
        start = max(now, self._wire_free_at)
        if (spec.rate_bits and start - now > QUEUE_S) or self._queued_bytes + len(packet) > MAX_QUEUED_BYTES:
            c.overflow += 1
            return
        if spec.rate_bits:
            self._wire_free_at = start + len(packet) * 8 / spec.rate_bits
        else:
            self._wire_free_at = start
        jitter = self._random.uniform(-spec.jitter_ms, spec.jitter_ms) if spec.jitter_ms else 0.0
        due = max(self._wire_free_at + max(0.0, spec.delay_ms + jitter) / 1000, self._last_due)
        self._last_due = due
        self._queue.append((due, packet))
        self._queued_bytes += len(packet)

    def next_due(self) -> float | None:
        """When the head of the queue is due, or None when it is empty."""
        return self._queue[0][0] if self._queue else None

    def pop_due(self, now: float, limit: int) -> list[bytes]:
        """Up to limit packets due by now, in order; the caller delivers them and reports
        each outcome with delivered()."""
        out: list[bytes] = []
        while self._queue and len(out) < limit and self._queue[0][0] <= now:
            packet = self._queue.popleft()[1]
            self._queued_bytes -= len(packet)
            out.append(packet)
        return out

    def delivered(self, packet: bytes, ok: bool) -> None:
        if ok:
            self.counters.delivered += 1
            self.counters.delivered_bytes += len(packet)
        else:
            self.counters.write_errors += 1

    def cut(self) -> None:
        """Drops what is queued and everything offered until heal()."""
        self.is_cut = True
        self.counters.cut += len(self._queue)
        self._queue.clear()
        self._queued_bytes = 0

    def heal(self) -> None:
        self.is_cut = False

    def queued(self) -> int:
        return len(self._queue)
