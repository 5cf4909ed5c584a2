"""What one job's pushes and pulls put on the wire, as the worker sees it: the compressed
push (transport.compress) with error feedback, one residual per shard, and the byte counts
behind shardps_worker_wire_bytes_total and shardps_worker_compression_ratio (of pushes).

Owned by the job's training thread (as JobShards is); not thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shardps.proto import codec, common_pb2, compress
from shardps.proto.spec import JobSpec
from shardps.worker.feedback import ErrorFeedback
from shardps.worker.metrics import WorkerMetrics
from shardps.worker.momentum import WorkerMomentum


def for_spec(spec: JobSpec, job_id: str, metrics: WorkerMetrics) -> WirePush:
    """The WirePush of a job's transport and optimizer settings."""
    transport, opt = spec["transport"], spec["optimizer"]
    sync = spec["consistency"]["mode"] == "sync"  # only sync jobs roll back
    checkpoint = spec["checkpoint"]
    return WirePush(transport["compress"], codec.DTYPE_NAMES[transport["dtype"]], job_id, metrics,
                    transport["compress_warmup_steps"], opt["precondition_pushes"],
                    opt["betas"][0] if opt["worker_momentum"] else None, transport["compress_warmup"],
                    save_every=checkpoint["every_steps"] if sync else 0, saved_kept=checkpoint["worker_copies"])


@dataclass(frozen=True)
class _Saved:
    """What a worker's pushes carry from step to step, as it was before one step's push."""

    feedback: dict[str, torch.Tensor]
    warmup: dict[str, torch.Tensor]
    momentum: dict[str, Any]


class WirePush:
    """One job's wire form of its gradient and the bytes its transfers carry.

    `setting` is the spec's transport.compress: "none" pushes the gradient in `dtype`;
    anything else encodes each shard's slice with error feedback (`encode`) from step
    `warmup_steps` on (transport.compress_warmup_steps; before it, pushes are uncompressed,
    or in `warmup_setting`'s encoding with error feedback of their own
    (transport.compress_warmup), and the residuals untouched), and `reset`
    drops the residuals when the job's weights are replaced (a rollback or a rewind), since
    they are owed to steps that will be replayed.

    `precondition` (optimizer.precondition_pushes): after the warm-up each shard's slice is
    divided by the shard's frozen denominator D before it is compressed; `encode`'s `fetch`
    reads every shard's D (GetPreconditioner), once, and again after a `reset` or when the
    shards' lengths change (server/ps/preconditioned.py is the servers' side).

    `momentum_beta1` (optimizer.worker_momentum, with `precondition`): Adam's beta1; the
    worker then keeps its own momentum per shard (worker/momentum.py), through the warm-up
    too, and after it compresses that momentum, bias-corrected, instead of g / D. `reset`
    drops it with the residuals: it starts again at 0.

    `save_every` (a sync job's checkpoint.every_steps; 0: never): before the push of each
    step that is a multiple of it, a copy of the residuals and momenta is kept (the newest
    `saved_kept`, checkpoint.worker_copies: by default the newest checkpoint's and the one
    before it), the state the worker had at the version the servers checkpoint there. A
    rollback to such a version (`rewind`) takes it back, so the replayed pushes are bitwise
    those of a run without the failure; a rollback to any other version starts from none.
    It costs `saved_kept` copies of that state (one or two fp32 copies of the model each).
    """

    def __init__(self, setting: str, dtype: common_pb2.DType, job_id: str,
                 metrics: WorkerMetrics, warmup_steps: int = 0, precondition: bool = False,
                 momentum_beta1: float | None = None, warmup_setting: str = "none",
                 save_every: int = 0, saved_kept: int = 2):
        self.warmup_steps = warmup_steps  # steps 0..warmup_steps-1 push in `dtype` or warmup_setting
        self.precondition = precondition
        if momentum_beta1 is not None and not precondition:
            raise ValueError("worker momentum needs preconditioned pushes")
        self.momentum = None if momentum_beta1 is None else WorkerMomentum(momentum_beta1)
        self._denominators: list[torch.Tensor] | None = None  # per shard, in shard order
        self.feedback = None if setting == "none" else ErrorFeedback(compress.parse(setting))
        # The warm-up's own encoding and residuals (transport.compress_warmup), left behind
        # at its end: what it still owes is owed to Adam's variance, which then freezes.
        self.warmup_feedback = None if warmup_setting == "none" else ErrorFeedback(compress.parse(warmup_setting))
        self._itemsize = codec.element_size(dtype)
        self._bytes = metrics.wire_bytes
        self._ratio = metrics.compression_ratio.labels(job=job_id)
        self._job = job_id
        self._save_every = save_every if saved_kept > 0 else 0
        self._saved_kept = saved_kept
        self._saved: dict[int, _Saved] = {}  # step -> the state before its push

    def encode(self, grad: torch.Tensor, shards: Sequence[common_pb2.ShardRange], step: int,
               fetch: Callable[[], list[torch.Tensor]] | None = None) -> list[bytes] | None:
        """Each shard's slice of grad (flat fp32) in the compressed wire form, the residual
        carried in and the new one kept; None when pushes are not compressed (or `step` is in
        the warm-up). Called once a step: retries of that push resend the same bytes (so a
        DUPLICATE costs nothing). `fetch`: the shards' denominators, when preconditioning."""
        if self.feedback is None:
            return None
        self._save(step)
        slices = [grad[s.offset : s.offset + s.length] for s in shards]
        if step < self.warmup_steps:
            if self.momentum is not None:
                for s, g in zip(shards, slices, strict=True):
                    self.momentum.warm(f"shard{s.index}", g)
            if self.warmup_feedback is None:
                return None
            return [self.warmup_feedback.compress(f"shard{s.index}", g) for s, g in zip(shards, slices, strict=True)]
        if self.precondition:
            denoms = self._denominators_for(shards, fetch)
            if self.momentum is not None:  # the momentum stepped chunk by chunk as it is encoded
                return [self.feedback.compress_with(f"shard{s.index}", s.length,
                                                    self.momentum.frozen(f"shard{s.index}", g, d))
                        for s, g, d in zip(shards, slices, denoms, strict=True)]
            slices = [g / d for g, d in zip(slices, denoms, strict=True)]
        return [self.feedback.compress(f"shard{s.index}", g) for s, g in zip(shards, slices, strict=True)]

    def _denominators_for(self, shards: Sequence[common_pb2.ShardRange],
                          fetch: Callable[[], list[torch.Tensor]] | None) -> list[torch.Tensor]:
        lengths = [s.length for s in shards]
        if self._denominators is None or [d.numel() for d in self._denominators] != lengths:
            if fetch is None:
                raise ValueError("preconditioned pushes need the shards' denominators")
            self._denominators = fetch()
        return self._denominators

    def reset(self) -> None:
        """Drops the residuals, the denominators (a restored shard may hold another D) and
        the worker's momentum."""
        self._denominators = None
        if self.momentum is not None:
            self.momentum.reset()
        for feedback in (self.feedback, self.warmup_feedback):
            if feedback is not None:
                feedback.reset()

    def rewind(self, version: int) -> None:
        """A rollback to `version`: the state saved before that step's push, if there is one,
        else none (`reset`); the states saved at later steps are dropped with the steps they
        belonged to."""
        saved = self._saved.get(version)
        self.reset()
        self._saved = {step: s for step, s in self._saved.items() if step <= version}
        if saved is None:
            return
        for feedback, residuals in ((self.feedback, saved.feedback), (self.warmup_feedback, saved.warmup)):
            if feedback is not None:
                feedback.restore(residuals)
        if self.momentum is not None:
            self.momentum.restore(saved.momentum)

    def _save(self, step: int) -> None:
        """Keeps the state before `step`'s push, once, if the servers checkpoint there."""
        if not self._save_every or step % self._save_every or step in self._saved:
            return
        self._saved[step] = _Saved(self.feedback.saved() if self.feedback is not None else {},
                                   self.warmup_feedback.saved() if self.warmup_feedback is not None else {},
                                   self.momentum.saved() if self.momentum is not None else {})
        for old in sorted(self._saved)[:-self._saved_kept]:
            del self._saved[old]

    def pushed(self, numel: int, encoded: Sequence[bytes] | None) -> None:
        """Counts one push's payload (elements or encodings; frame headers not included)."""
        sent = sum(map(len, encoded)) if encoded is not None else numel * self._itemsize
        self._bytes.labels(job=self._job, direction="push").inc(sent)
        if sent:
            self._ratio.set(numel * 4 / sent)  # against fp32

    def pulled(self, received: int) -> None:
        """Counts one ready pull's payload bytes (PullResult.wire_bytes)."""
        self._bytes.labels(job=self._job, direction="pull").inc(received)
