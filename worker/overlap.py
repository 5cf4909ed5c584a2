"""Overlap of the wire with compute on one worker (docs/network.md, "Overlap"): the gradient is
cut into buckets (contiguous ranges of the flat vector, at parameter boundaries); autograd
hooks hand each bucket to the push in flight as soon as its gradients are final, and forward
pre-hooks make each module wait only for its own weights of the pull in flight.

Both are exact: a push is applied only once whole, and a module runs only on weights that
have landed. A model's forward must use each parameter through the module that owns it (as
torch's layers and every built-in model do): a parameter read elsewhere is not waited for.

Threading: owned by the training thread; the hooks run on autograd's and the forward's
threads (the training thread on CPU) while a push or pull is armed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from shardps.proto import common_pb2

# A bucket closes once it holds at least this many bytes of fp32 gradient (a parameter is
# never split; a larger one is a bucket of its own). Small enough that the last bucket of
# backward, which nothing hides, is a small part of a 100M-parameter push.
BUCKET_BYTES = 4 * 1024 * 1024


class PullBroken(Exception):
    """The armed pull failed while the forward waited for it (raised out of the forward)."""

    def __init__(self, cause: BaseException):
        super().__init__(f"the pull broke off while landing: {cause}")
        self.cause = cause


class PushInFlight(Protocol):
    """psclient.overlapped.OverlappedPush as the hooks see it."""

    def ready(self, bucket: int) -> None: ...


class PullLanding(Protocol):
    """psclient.inflight.PullInFlight as the hooks see it."""

    def wait(self, lo: int, hi: int) -> None: ...


def buckets_of(layout: common_pb2.Layout,
               bucket_bytes: int = BUCKET_BYTES) -> tuple[list[tuple[int, int]], list[int]]:
    """The buckets of a layout, as flat ranges [lo, hi) covering [0, total) in order, and
    each parameter's bucket (by layout position)."""
    limit = max(1, bucket_bytes // 4)
    ranges: list[tuple[int, int]] = []
    of_param: list[int] = []
    lo = 0
    for param in layout.params:
        of_param.append(len(ranges))
        end = param.offset + _numel(param.shape)
        if end - lo >= limit:
            ranges.append((lo, end))
            lo = end
    if lo < layout.total or not ranges:
        ranges.append((lo, layout.total))
    return ranges, of_param


def _numel(shape: object) -> int:
    n = 1
    for d in shape:  # type: ignore[attr-defined]
        n *= int(d)
    return n


class Overlap:
    """The hooks on one model whose parameters are `layout`'s (in named_parameters order).

    `arm_push(push)` before backward: each bucket goes to `push.ready` once every parameter
    in it has its gradient accumulated. `arm_pull(pull)` before forward: every module with
    parameters of its own waits in a forward pre-hook until they have landed; `on_wait`
    hears how long (seconds) each such wait took.
    """

    def __init__(self, model: nn.Module, layout: common_pb2.Layout,
                 on_wait: Callable[[float], None] | None = None,
                 bucket_bytes: int = BUCKET_BYTES):
        self.buckets, of_param = buckets_of(layout, bucket_bytes)
        self._members = [0] * len(self.buckets)
        for b in of_param:
            self._members[b] += 1
        self._left: list[int] = []
        self._push: PushInFlight | None = None
        self._pull: PullLanding | None = None
        self._on_wait = on_wait
        self.waited_s = 0.0  # forward's total wait on the armed pull
        self._handles: list[RemovableHandle] = []
        params = list(model.parameters())
        spans: dict[int, tuple[int, int]] = {}
        for param, entry, bucket in zip(params, layout.params, of_param, strict=True):
            spans[id(param)] = (entry.offset, entry.offset + param.numel())
            self._handles.append(param.register_post_accumulate_grad_hook(
                self._grad_hook(bucket)))
        for module in model.modules():
            own = [spans[id(p)] for p in module.parameters(recurse=False) if id(p) in spans]
            if own:
                lo, hi = min(s[0] for s in own), max(s[1] for s in own)
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(lo, hi)))

    def _grad_hook(self, bucket: int) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            push = self._push
            if push is None:
                return
            self._left[bucket] -= 1
            if self._left[bucket] == 0:
                push.ready(bucket)
        return hook

    def _pre_hook(self, lo: int, hi: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object) -> None:
            pull = self._pull
            if pull is None:
                return
            start = time.perf_counter()
            try:
                pull.wait(lo, hi)
            except Exception as exc:
                raise PullBroken(exc) from exc
            waited = time.perf_counter() - start
            self.waited_s += waited
            if self._on_wait is not None:
                self._on_wait(waited)
        return hook

    def arm_push(self, push: PushInFlight) -> None:
        self._left = list(self._members)
        self._push = push

    def disarm_push(self) -> None:
        self._push = None

    def arm_pull(self, pull: PullLanding) -> None:
        self.waited_s = 0.0
        self._pull = pull

    def disarm_pull(self) -> None:
        self._pull = None

    def close(self) -> None:
        """Removes the hooks."""
        self._push = self._pull = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
