"""The one retry pause of shardps: doubling from a first pause up to a cap, optionally within a
window that ends the retries (a worker's parameter-server and coordinator calls, every
daemon's link to the coordinator)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class Backoff:
    """Doubling pauses from `first_s` up to `max_s`, until `window_s` after the first failure.

    Pure: time comes from `clock`. `window_s` = inf retries forever; `reset()` after a success
    starts the doubling (and the window) again. Owned by one thread.
    """

    def __init__(self, first_s: float, max_s: float, window_s: float = math.inf,
                 clock: Callable[[], float] = time.monotonic):
        self.first_s, self.max_s, self.window_s = first_s, max_s, window_s
        self._clock = clock
        self._pause = first_s
        self.started = clock()
        self.tries = 0  # pauses handed out since the start (or the last reset)

    def expired(self) -> bool:
        """The window has passed: give up instead of pausing again."""
        return self._clock() - self.started >= self.window_s

    def next(self) -> float:
        """The pause before the next try (never past the window's end)."""
        self.tries += 1
        pause = min(self._pause, max(0.0, self.window_s - (self._clock() - self.started)))
        self._pause = min(self._pause * 2, self.max_s)
        return pause

    def reset(self) -> None:
        """A try succeeded: the next failure starts from `first_s` and a new window."""
        self._pause = self.first_s
        self.started = self._clock()
        self.tries = 0
