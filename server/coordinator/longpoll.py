"""Long-polls the coordinator holds: an idle worker's heartbeat waiting for an assignment, a
GetJob waiting for a state change. Each waits on a condition of the servicer's lock, so it
holds no lock while it waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from .metrics import CoordinatorMetrics

# Long-polls (HeartbeatRequest.wait_for_assignment_ms, GetJobRequest.wait_ms) held at once
# by default. Each holds a gRPC pool thread, so a big cluster's idle workers must not take
# them all: beyond this, calls are answered at once and their callers fall back on polling.
MAX_HELD_CALLS = 16


class HeldCalls:
    """The long-polls held on one lock's condition, at most `max_held` at once.

    Thread-safety: `hold` and `wake` are called with `lock` held (the servicer's lock, inside
    its serving block); `wake_all` and `close` take it themselves. The count of held calls
    is only read and changed under that lock.

    Args:
        lock: the servicer's lock; held calls wait on a condition of it.
        max_held: long-polls held at once; the others are answered at once.
        metrics: where outcomes and the held count go.
    """

    def __init__(self, lock: threading.Lock, max_held: int, metrics: CoordinatorMetrics):
        self._lock = lock
        self._changed = threading.Condition(lock)  # notified when an RPC or sweep ends
        self._held = 0
        self._max_held = max_held
        self._closing = False
        self._metrics = metrics

    def hold(self, call: str, context: grpc.ServicerContext, hold_s: float,
             done: Callable[[], bool]) -> None:
        """Waits, without the lock, until done() (checked under the lock after every RPC and
        sweep), `hold_s` is up, the call is cancelled or `close()` is called. Returns at once
        when done() already holds or max_held calls are held. Caller holds the lock."""
        if done() or self._closing:
            return
        if self._held >= self._max_held:
            self._metrics.long_polls.labels(call, "over_limit").inc()
            return
        deadline = time.monotonic() + hold_s
        self._held += 1
        self._metrics.held_calls.set(self._held)
        context.add_callback(self.wake_all)  # a cancelled call stops holding at once
        try:
            self._metrics.long_polls.labels(call, self._wait(context, deadline, done)).inc()
        finally:
            self._held -= 1
            self._metrics.held_calls.set(self._held)

    def _wait(self, context: grpc.ServicerContext, deadline: float,
              done: Callable[[], bool]) -> str:
        """Waits on the condition; returns the outcome (a `long_polls` label)."""
        while not done():
            left = deadline - time.monotonic()
            if self._closing or not context.is_active():
                return "cancelled"
            if left <= 0:
                return "timed_out"
            self._changed.wait(left)
        return "woken"

    def wake(self) -> None:
        """Lets held long-polls look again (caller holds the lock)."""
        if self._held:
            self._changed.notify_all()

    def wake_all(self) -> None:
        """As wake(), from a thread that does not hold the lock (a call's done-callback)."""
        with self._lock:
            self._changed.notify_all()

    def close(self) -> None:
        """Answers every held long-poll now and holds no more (takes the lock)."""
        with self._lock:
            self._closing = True
            self._changed.notify_all()
