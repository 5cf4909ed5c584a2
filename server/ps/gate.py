"""The consistency gate of one shard: sync rounds, ssp clocks; async passes every push.

It decides which push steps Adam and which pull may read; it runs no Adam and holds no lock.
Thread-safety: none of its own; the shard's lock guards every call. Ownership: a gradient
handed to `contribute` is the gate's until its round closes (`take_round` hands it back) or
is dropped (then `release` takes it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shardps.proto import common_pb2, ps_pb2, refusals

from .errors import StepAheadError

log = logging.getLogger("shardps.ps")


@dataclass
class Contribution:
    """One worker's push to an open sync round."""

    batch_size: int
    grad: torch.Tensor


class Gate:
    """Sync: one round per version, closed when every live worker has pushed its step.
    ssp: each worker's clock (steps pushed); a pull at clock c waits until every live worker's
    clock is >= c - staleness. async: nothing waits.

    `name` labels log lines ("job J shard I"); `release` takes back a dropped gradient.
    """

    def __init__(self, mode: int, staleness: int, name: str,
                 release: Callable[[torch.Tensor], None]):
        self.mode = mode
        self.staleness = staleness
        self._name = name
        self._release = release
        self.clocks: dict[str, int] = {}             # worker id -> steps pushed
        self.round: dict[str, Contribution] = {}     # sync: open round (step == version)
        self._round_opened_with = 0                  # sync: live workers at its first push
        self.short_rounds = 0                        # sync: rounds closed without them all
        self.max_clock_spread = 0                    # ssp: largest spread a pull was granted at

    @property
    def sync(self) -> bool:
        return self.mode == common_pb2.CONSISTENCY_SYNC

    # -- pushes -----------------------------------------------------------------------------

    def check(self, worker: str, step: int, version: int) -> ps_pb2.PushStatus | None:
        """Sync: the push's outcome if already decided (STALE, DUPLICATE), else None.

        Raises:
            StepAheadError: `step` is beyond the open round.
        """
        if not self.sync:
            return None
        if step < version:
            return ps_pb2.PUSH_STATUS_STALE
        if step > version:
            raise StepAheadError(f"{refusals.STEP_AHEAD} step {step} is ahead of the open "
                                 f"round {version}")
        if worker in self.round:  # a new incarnation re-pushing the same step
            return ps_pb2.PUSH_STATUS_DUPLICATE
        return None

    def record(self, worker: str, step: int) -> None:
        """Counts an accepted push of `step` on the worker's clock."""
        self.clocks[worker] = max(self.clocks.get(worker, 0), step + 1)

    def contribute(self, worker: str, batch_size: int, grad: torch.Tensor,
                   live: Sequence[str]) -> bool:
        """Sync: adds a push to the open round; returns whether the round is now complete."""
        if not self.round:
            self._round_opened_with = len(live)
        self.round[worker] = Contribution(batch_size, grad)
        return self.complete(live)

    def holds(self, worker: str, step: int, version: int, live: Sequence[str]) -> bool:
        """Sync, the job ended and its final version not yet named: whether a push is one
        the open round keeps (see Shard.set_job_state): a live worker's first push of it."""
        return self.sync and step == version and worker in live and worker not in self.round

    def hold(self, worker: str, batch_size: int, grad: torch.Tensor) -> None:
        """Keeps a push `holds` admitted in the open round without counting it anywhere
        else; only naming the final version may close the round with it."""
        self.round[worker] = Contribution(batch_size, grad)

    def complete(self, live: Sequence[str]) -> bool:
        """Whether the open round holds a push of every live worker."""
        return bool(self.round) and all(w in self.round for w in live)

    def take_round(self, live: Sequence[str], version: int) -> list[Contribution]:
        """Closes the open round: its live workers' contributions, in rank order.

        Contributions of workers that are no longer live are dropped. A round that closes
        with fewer contributions than it had live workers when it opened (a worker left
        mid-round) counts as short and is logged. Empty if no live contribution was left.
        """
        parts = [self.round.pop(w) for w in live if w in self.round]
        self.drop_round()
        if parts and len(parts) < self._round_opened_with:
            self.short_rounds += 1
            log.warning("%s: round %d completed with %d of the %d workers it opened with",
                        self._name, version, len(parts), self._round_opened_with)
        return parts

    def drop_round(self) -> None:
        """Forgets the open round (its pushes are not applied; the workers push again)."""
        for part in self.round.values():
            self._release(part.grad)
        self.round.clear()

    # -- pulls ------------------------------------------------------------------------------

    def clock_ok(self, clock: float, live: Sequence[str]) -> bool:
        """ssp: whether a pull at `clock` may read (always true in the other modes)."""
        if self.mode != common_pb2.CONSISTENCY_SSP:
            return True
        lowest = self._min_clock(live)
        return lowest is None or lowest >= clock - self.staleness

    def granted(self, clock: float, live: Sequence[str]) -> None:
        """ssp: records the clock spread a pull at (finite) `clock` was granted at."""
        if self.mode != common_pb2.CONSISTENCY_SSP:
            return
        lowest = self._min_clock(live)
        if lowest is not None and clock - lowest > self.max_clock_spread:
            self.max_clock_spread = int(clock - lowest)

    def _min_clock(self, live: Sequence[str]) -> int | None:
        return min((self.clocks.get(w, 0) for w in live), default=None)


def round_terms(parts: Sequence[Contribution]) -> list[tuple[torch.Tensor, float | None]]:
    """A closed round's step gradient as sum(grad * weight) terms, in rank order.

    Weighted by batch size. Workers with no samples this step push weight 0 and are left out;
    if nobody had samples the round still steps on the plain mean, so the barrier moves on. A
    single term has weight None: used as is, so one worker matches torch bitwise.
    """
    weighted = [p for p in parts if p.batch_size > 0] or list(parts)
    if len(weighted) == 1:
        return [(weighted[0].grad, None)]
    total = sum(p.batch_size for p in weighted)
    share = [p.batch_size / total if total else 1 / len(weighted) for p in weighted]
    return [(p.grad, w) for p, w in zip(weighted, share, strict=True)]
