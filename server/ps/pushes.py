"""Push handling of one shard: admission (what a push header and gradient must be, and the
outcomes decided before any elements are read) and the push itself (buffered in a sync round,
or one Adam step on arrival).

Pure core: no gRPC. Functions take the shard's `ShardCore`; `admit_locked` expects the caller
to hold its condition, `push` takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardps.proto import codec, ps_pb2

from .core import ShardCore
from .errors import InvalidPushError

# Gradients a push may hand over: fp32, or kept in the wire dtype it arrived in.
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PushResult:
    """What one push did.

    Attributes:
        status: the expected outcome, a `ps_pb2.PushStatus` value.
        version: the shard's version after handling the push.
        staleness: async/ssp pushes that were applied: version - base_version on arrival.
        apply_seconds: time spent in Adam (and the sync mean) if this push ran a step.
    """

    status: ps_pb2.PushStatus
    version: int
    staleness: int | None = None
    apply_seconds: float | None = None


def admit_locked(core: ShardCore, worker_id: str, incarnation: int, step: int, length: int,
                 batch_size: int) -> ps_pb2.PushStatus | None:
    """The outcome of a push decided by its header alone (JOB_DONE, DUPLICATE, STALE; none of
    these can change back), else None. Raises what `push` raises."""
    core.check_open()
    _check_header(length, core.config.length, step, batch_size)
    if core.frozen and not (core.final_version is None
                            and core.gate.holds(worker_id, step, core.version, core.workers)):
        return ps_pb2.PUSH_STATUS_JOB_DONE
    budget = core.config.step_budget
    if core.gate.sync and budget and step >= budget:
        return ps_pb2.PUSH_STATUS_JOB_DONE  # known in advance: no shard passes the budget
    early = core.fencing.check(worker_id, incarnation, step, core.workers)
    return early if early is not None else core.gate.check(worker_id, step, core.version)


def push(core: ShardCore, grad: torch.Tensor, worker_id: str, incarnation: int, step: int,
         base_version: int, batch_size: int, checked: bool) -> PushResult:
    """Handles one worker's gradient for one step; takes over `grad`. Takes `core.cond`.

    async/ssp: one Adam step on arrival. sync: buffered in the round of `step`; the last
    live worker's push runs one Adam step on the batch-size-weighted mean. `checked`: the
    caller has already verified every value is finite (the servicer does, chunk by chunk
    as the gradient arrives), so the whole-vector check is skipped. A value beyond
    codec.MAX_GRADIENT is refused like NaN: Adam's second moment would overflow.

    Raises:
        InvalidPushError: wrong length, bad batch size or step, non-finite values or
            values beyond codec.MAX_GRADIENT.
        FencedError: this worker incarnation was declared dead.
        UnknownWorkerError: worker not among the live workers.
        StepAheadError: sync, `step` is beyond the open round.
        ShardClosedError: the shard was dropped or replaced.
    Nothing changes when it raises.
    """
    _check_gradient(grad, core.config.length)
    # Outside the lock: the check reads the whole gradient.
    if not checked and not codec.pushable(grad):
        refused = unpushable(grad)
        core.staging.release(grad)
        raise refused
    keep = False
    try:
        with core.cond:
            early = admit_locked(core, worker_id, incarnation, step, grad.numel(), batch_size)
            if early is not None:
                return PushResult(early, core.version)
            if core.frozen:  # held, never applied unless the final version needs it
                core.gate.hold(worker_id, batch_size, grad)
                keep = True
                return PushResult(ps_pb2.PUSH_STATUS_JOB_DONE, core.version)
            core.fencing.record(worker_id, incarnation, step)
            core.gate.record(worker_id, step)
            if core.gate.sync:
                keep = True
                if not core.gate.contribute(worker_id, batch_size, grad, core.workers):
                    core.cond.notify_all()  # clocks moved
                    return PushResult(ps_pb2.PUSH_STATUS_ACCEPTED, core.version)
                seconds = core.close_round()
                return PushResult(ps_pb2.PUSH_STATUS_APPLIED, core.version,
                                  apply_seconds=seconds)
            staleness = max(0, core.version - base_version)
            seconds = core.step([(grad, None)])
            core.applied(1)
            return PushResult(ps_pb2.PUSH_STATUS_APPLIED, core.version, staleness, seconds)
    finally:
        if not keep:
            core.staging.release(grad)


def _check_header(length: int, expected: int, step: int, batch_size: int) -> None:
    """Raises InvalidPushError for a push header no shard state could accept."""
    if length != expected:
        raise InvalidPushError(f"push length {length} != shard length {expected}", "bad_length")
    if step < 0:
        raise InvalidPushError(f"step must be >= 0, got {step}", "bad_step")
    if batch_size < 0:
        raise InvalidPushError(f"batch_size must be >= 0, got {batch_size}", "bad_batch_size")


def _check_gradient(grad: torch.Tensor, length: int) -> None:
    if grad.dtype not in _GRAD_DTYPES or grad.dim() != 1 or grad.numel() != length:
        raise InvalidPushError(f"gradient must be fp32[{length}] (or bf16/fp16), got "
                               f"{grad.dtype} {tuple(grad.shape)}", "bad_length")


def unpushable(grad: torch.Tensor) -> InvalidPushError:
    """Why a gradient that is not codec.pushable is refused: non-finite values, or values so
    large that Adam's second moment (a mean of g*g, in fp32) would overflow to inf, after
    which those weights would never move again."""
    if not codec.finite(grad):
        return InvalidPushError("gradient has non-finite values", "non_finite")
    return InvalidPushError(
        f"gradient has values beyond +-{codec.MAX_GRADIENT:.3g} (largest "
        f"{float(grad.abs().max()):.3g}): Adam's state would overflow", "too_large")
