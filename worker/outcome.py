"""How a job ends on a worker: the Outcome the trainer returns, and End, the exception that
carries it out of the training loop from wherever the end is decided."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """How a job ended on this worker."""

    kind: str    # "finished" (step budget reached), "stopped" (told to, or the job ended),
    #              "failed" (reported as the job's failure), "abandoned" (gave up: unreachable),
    #              "fenced" (a server refused this incarnation's push: register again)
    reason: str


class End(Exception):
    """Ends the job's run on this worker with `outcome`."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.outcome = Outcome(kind, reason)
