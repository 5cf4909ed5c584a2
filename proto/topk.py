"""Top-k sparsification (proto/compress.py's `topk`): the k largest magnitudes as ascending
int32 (or int64) indices, then their fp32 values."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from shardps.proto.codecbase import (
    CHUNK,
    CODEC_TOPK,
    HEADER,
    INT32_LIMIT,
    CompressError,
    as_bytes,
    body_of,
    check_flat,
    check_held,
    check_inplace,
    check_out,
    frombuffer,
    read_header,
)


def _select(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The indices, ascending, of flat's k largest magnitudes, ties broken towards the lower
    index (what a stable descending sort would keep), in linear time: every element above
    the k-th largest magnitude, then the lowest-indexed of those equal to it. numpy's
    partition and flatnonzero: 6x and 1.3x torch's kthvalue and nonzero here."""
    n = flat.numel()
    if k >= n:
        return torch.arange(n)
    magnitude = flat.abs().numpy()
    kth = np.partition(magnitude, n - k)[n - k]
    keep = magnitude > kth
    ties = np.flatnonzero(magnitude == kth)[: k - int(np.count_nonzero(keep))]
    keep[ties] = True
    indices = np.flatnonzero(keep)
    if indices.size != k:  # a NaN among the magnitudes (the server refuses such a push anyway)
        return torch.sort(torch.sort(flat.abs(), descending=True, stable=True).indices[:k]).values
    return torch.from_numpy(indices)


@dataclass(frozen=True)
class TopK:
    """Keeps the `ratio` fraction (at least one) of elements with the largest magnitude."""

    ratio: float = 0.01
    name: str = "topk"

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"topk ratio must be in (0, 1], got {self.ratio}")

    def k(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.ratio * numel)))

    def size(self, numel: int) -> int:
        width = 4 if numel < INT32_LIMIT else 8
        return HEADER.size + self.k(numel) * (width + 4)

    def _encode(self, flat: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        n = flat.numel()
        k = self.k(n)
        indices = _select(flat, k)
        width = 4 if n < INT32_LIMIT else 8
        index_dtype = torch.int32 if width == 4 else torch.int64
        data = b"".join((HEADER.pack(CODEC_TOPK, width, 0, k, n), as_bytes(indices.to(index_dtype)),
                         as_bytes(flat[indices])))
        return data, indices

    def encode(self, flat: torch.Tensor) -> bytes:
        return self._encode(check_flat(flat))[0]

    def encode_feedback(self, flat: torch.Tensor, fill: Callable[[int, int], None] | None = None) -> bytes:
        check_inplace(flat)
        if fill is not None:  # top-k needs all of it before it selects
            for lo in range(0, flat.numel(), CHUNK):
                fill(lo, min(flat.numel(), lo + CHUNK))
        data, indices = self._encode(flat)
        flat[indices] = 0.0  # x - x: what was sent is owed no more; the rest is owed whole
        return data

    def encode_delta(self, target: torch.Tensor, held: torch.Tensor, out: torch.Tensor | None = None) -> bytes:
        diff = check_flat(target) - check_held(held, target.numel())
        data, indices = self._encode(diff)
        if out is not None:
            check_held(out, target.numel()).copy_(held)
            held = out
        held.index_add_(0, indices, diff[indices])  # what decode_into(data, held, add=True) does
        return data

    def _parts(self, data: bytes | memoryview) -> tuple[int, torch.Tensor, torch.Tensor]:
        width, k, n = read_header(data, CODEC_TOPK)
        if width not in (4, 8) or k > n:
            raise CompressError(f"top-k header has index width {width}, k {k}, numel {n}")
        body = body_of(data, HEADER.size + k * (width + 4))
        indices = frombuffer(body, torch.int32 if width == 4 else torch.int64, k, 0).long()
        values = frombuffer(body, torch.float32, k, k * width)
        if k and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise CompressError(f"top-k index out of range [0, {n})")
        return n, indices, values

    def decode(self, data: bytes | memoryview) -> torch.Tensor:
        n, indices, values = self._parts(data)
        out = torch.zeros(n, dtype=torch.float32)
        out[indices] = values
        return out

    def decode_into(self, data: bytes | memoryview, out: torch.Tensor, add: bool = False) -> None:
        n, indices, values = self._parts(data)
        check_out(out, n)
        if add:
            out.index_add_(0, indices, values)
        else:
            out.zero_()
            out[indices] = values
