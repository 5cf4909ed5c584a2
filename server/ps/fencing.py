"""Fencing and dedup of pushes: which worker incarnations may push, which steps counted.

Fencing (docs/architecture.md, "Failures"): a worker the coordinator declared dead, or
replaced by a newer incarnation, has its old incarnation's pushes refused. Dedup: a push of a
step its (worker, incarnation) already had applied is answered DUPLICATE and changes nothing.
Thread-safety: none of its own; the shard's lock guards every call.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardps.proto import ps_pb2, refusals

from .errors import FencedError, UnknownWorkerError


class Fencing:
    """The incarnation tables of one shard.

    Attributes:
        incarnations: the live workers' incarnations, as the coordinator last said.
        departed: the last incarnation of each worker that left the job (or was replaced).
        applied: (worker, incarnation) -> highest step whose push was accepted.
    """

    def __init__(self) -> None:
        self.incarnations: dict[str, int] = {}
        self.departed: dict[str, int] = {}
        self.applied: dict[tuple[str, int], int] = {}

    def adopt(self, live: dict[str, int]) -> None:
        """Takes the live workers' incarnations (worker -> incarnation); fences the old ones
        of workers that left the live set or came back under a newer incarnation."""
        for worker, old in self.incarnations.items():
            if live.get(worker) != old:
                self.departed[worker] = max(self.departed.get(worker, 0), old)
        self.incarnations = dict(live)

    def check(self, worker: str, incarnation: int, step: int,
              live: Sequence[str]) -> ps_pb2.PushStatus | None:
        """DUPLICATE if this incarnation already pushed `step` (or a later one), else None.

        Raises:
            FencedError: the incarnation was declared dead.
            UnknownWorkerError: the worker is not among the `live` workers.
        """
        fenced = self.departed.get(worker, 0)
        if incarnation < self.incarnations.get(worker, 0) or (
                worker not in live and 0 < incarnation <= fenced):
            raise FencedError(f"{refusals.FENCED} this worker incarnation was declared dead; "
                              "register again")
        if worker not in live:
            raise UnknownWorkerError("worker is not a live worker of this job")
        if step <= self.applied.get((worker, incarnation), -1):
            return ps_pb2.PUSH_STATUS_DUPLICATE
        return None

    def record(self, worker: str, incarnation: int, step: int) -> None:
        """Counts an accepted push: later pushes of `step` or earlier are duplicates."""
        self.applied[(worker, incarnation)] = step

    def load(self, incarnations: dict[str, int], departed: dict[str, int],
             applied: dict[tuple[str, int], int]) -> None:
        """Replaces the tables with a checkpoint's."""
        self.incarnations = dict(incarnations)
        self.departed = dict(departed)
        self.applied = dict(applied)
