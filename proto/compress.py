"""Lossy wire forms of a flat fp32 tensor: top-k sparsification, int8 with a scale per block,
and 1-bit sign with a scale per block. The contract for compressed pushes and pull deltas.

Every encoded tensor is one self-describing byte string: a 16-byte header, then the body.

  header  <B B H I Q>  codec (CODEC_*), index width in bytes (top-k: 4 or 8, else 0),
                       reserved (0), k (top-k) or block (int8, sign), numel
  top-k   k indices (int32, or int64 when numel >= 2**31), ascending, then k fp32 values
  int8    ceil(numel / block) fp32 scales, then numel int8 codes: x ~= code * scale
  sign    ceil(numel / block) fp32 scales, then ceil(numel / 8) bytes of sign bits, bit i of
          byte j for element 8j + i (1: >= 0, 0: < 0): x ~= +-scale

`size(numel)` is the exact length of `encode` for a tensor of numel elements; decoding
returns a fresh dense fp32 tensor. Encoding is deterministic (no randomness, ties in top-k
broken towards the lower index), so a sender and a receiver that both decode agree bitwise.
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch

from shardps.proto import ps_pb2

# decode() views immutable bytes and copies out of them at once (as the codec does).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

HEADER = struct.Struct("<BBHIQ")
CODEC_TOPK = 1  # k largest magnitudes, as (index, value) pairs
CODEC_INT8 = 2  # symmetric int8, scale = max |x| / 127 per block
CODEC_SIGN = 3  # one bit per element, scale = mean |x| per block
# A compressed push's header names its codec (PushHeader.compression, ps.proto): the same numbers.
PUSH_COMPRESSIONS: dict[int, ps_pb2.PushCompression] = {
    CODEC_TOPK: ps_pb2.PUSH_COMPRESSION_TOPK,
    CODEC_INT8: ps_pb2.PUSH_COMPRESSION_INT8,
    CODEC_SIGN: ps_pb2.PUSH_COMPRESSION_SIGN,
}
INT32_LIMIT = 2**31
MAX_BLOCK = 2**32 - 1


class CompressError(ValueError):
    """A byte string that is not an encoding this module wrote (bad header or length)."""


class Compressor(Protocol):
    """A lossy codec for 1-D fp32 tensors; stateless, so one instance serves every thread."""

    @property
    def name(self) -> str: ...

    def encode(self, flat: torch.Tensor) -> bytes: ...

    def decode(self, data: bytes | memoryview) -> torch.Tensor: ...

    def size(self, numel: int) -> int: ...


def _check_flat(flat: torch.Tensor) -> torch.Tensor:
    if flat.dim() != 1 or flat.dtype != torch.float32:
        raise CompressError(f"expected a 1-D float32 tensor, got {flat.dtype} {tuple(flat.shape)}")
    return flat.contiguous()


def _header(data: bytes | memoryview, codec: int) -> tuple[int, int, int]:
    """(index width, k or block, numel) of data, after checking its codec."""
    if len(data) < HEADER.size:
        raise CompressError(f"{len(data)} bytes is shorter than the {HEADER.size}-byte header")
    got, width, _, param, numel = HEADER.unpack_from(data)
    if got != codec:
        raise CompressError(f"codec {got} in the header, expected {codec}")
    return width, param, numel


def _body(data: bytes | memoryview, size: int) -> memoryview:
    if len(data) != size:
        raise CompressError(f"{len(data)} bytes, the header says {size}")
    return memoryview(data)[HEADER.size:]


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _frombuffer(buf: memoryview, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).clone()


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

    def encode(self, flat: torch.Tensor) -> bytes:
        flat = _check_flat(flat)
        n = flat.numel()
        k = self.k(n)
        # A stable descending sort breaks ties towards the lower index; topk() does not promise to.
        order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
        indices = torch.sort(order).values
        width = 4 if n < INT32_LIMIT else 8
        index_dtype = torch.int32 if width == 4 else torch.int64
        return b"".join((HEADER.pack(CODEC_TOPK, width, 0, k, n), _as_bytes(indices.to(index_dtype)),
                         _as_bytes(flat[indices])))

    def decode(self, data: bytes | memoryview) -> torch.Tensor:
        width, k, n = _header(data, CODEC_TOPK)
        if width not in (4, 8) or k > n:
            raise CompressError(f"top-k header has index width {width}, k {k}, numel {n}")
        body = _body(data, HEADER.size + k * (width + 4))
        indices = _frombuffer(body, torch.int32 if width == 4 else torch.int64, k, 0).long()
        values = _frombuffer(body, torch.float32, k, k * width)
        if k and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise CompressError(f"top-k index out of range [0, {n})")
        out = torch.zeros(n, dtype=torch.float32)
        out[indices] = values
        return out


def _blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """flat as (blocks, block), the last block padded with zeros."""
    pad = -flat.numel() % block
    if not pad:  # a view: padding copies the whole tensor
        return flat.view(-1, block)
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)


def _check_block(block: int) -> None:
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be in [1, {MAX_BLOCK}], got {block}")


@dataclass(frozen=True)
class Int8:
    """Symmetric int8 per block of `block` elements: code = round(x / scale), |code| <= 127."""

    block: int = 256
    name: str = "int8"

    def __post_init__(self) -> None:
        _check_block(self.block)

    def size(self, numel: int) -> int:
        return HEADER.size + 4 * math.ceil(numel / self.block) + numel

    def encode(self, flat: torch.Tensor) -> bytes:
        flat = _check_flat(flat)
        blocks = _blocks(flat, self.block)
        scales = blocks.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = (blocks / safe[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return b"".join((HEADER.pack(CODEC_INT8, 0, 0, self.block, flat.numel()), _as_bytes(scales),
                         _as_bytes(codes.view(-1)[: flat.numel()])))

    def decode(self, data: bytes | memoryview) -> torch.Tensor:
        _, block, n = _header(data, CODEC_INT8)
        _check_header_block(block)
        nblocks = math.ceil(n / block)
        body = _body(data, HEADER.size + 4 * nblocks + n)
        scales = _frombuffer(body, torch.float32, nblocks, 0)
        codes = _frombuffer(body, torch.int8, n, 4 * nblocks).float()
        return (_blocks(codes, block) * scales[:, None]).view(-1)[:n].contiguous()


def _check_header_block(block: int) -> None:
    if block < 1:
        raise CompressError("block 0 in the header")


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass(frozen=True)
class Sign:
    """One bit per element (its sign) and, per block, the mean magnitude as the scale."""

    block: int = 4096
    name: str = "sign"

    def __post_init__(self) -> None:
        _check_block(self.block)

    def size(self, numel: int) -> int:
        return HEADER.size + 4 * math.ceil(numel / self.block) + math.ceil(numel / 8)

    def encode(self, flat: torch.Tensor) -> bytes:
        flat = _check_flat(flat)
        n = flat.numel()
        blocks = _blocks(flat, self.block)
        starts = torch.arange(blocks.shape[0], dtype=torch.float32) * self.block
        counts = (n - starts).clamp(max=self.block)  # the last block may be short
        scales = blocks.abs().sum(dim=1) / counts
        bits = torch.nn.functional.pad((flat >= 0).to(torch.uint8), (0, -n % 8)).view(-1, 8)
        packed = (bits * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)
        return b"".join((HEADER.pack(CODEC_SIGN, 0, 0, self.block, n), _as_bytes(scales),
                         _as_bytes(packed)))

    def decode(self, data: bytes | memoryview) -> torch.Tensor:
        _, block, n = _header(data, CODEC_SIGN)
        _check_header_block(block)
        nblocks = math.ceil(n / block)
        nbytes = math.ceil(n / 8)
        body = _body(data, HEADER.size + 4 * nblocks + nbytes)
        scales = _frombuffer(body, torch.float32, nblocks, 0)
        packed = _frombuffer(body, torch.uint8, nbytes, 4 * nblocks)
        bits = (packed[:, None] & _BIT_WEIGHTS).ne(0).view(-1)[:n]
        signs = bits.float() * 2.0 - 1.0
        return (_blocks(signs, block) * scales[:, None]).view(-1)[:n].contiguous()


def max_size(numel: int) -> int:
    """No encoding of numel elements is longer (top-k at ratio 1 with int64 indices is 12 bytes
    an element; int8 at block 1 is 5): a receiver's bound before it reads one."""
    return HEADER.size + 12 * numel


def codec_of(data: bytes | memoryview) -> int:
    """The codec number (CODEC_*) in an encoding's header; raises CompressError if too short."""
    if len(data) < HEADER.size:
        raise CompressError(f"{len(data)} bytes is shorter than the {HEADER.size}-byte header")
    return int(data[0])


def numel_of(data: bytes | memoryview) -> int:
    """The element count an encoding's header declares (before decoding it)."""
    codec_of(data)
    return int(HEADER.unpack_from(data)[4])


def decode(data: bytes | memoryview) -> torch.Tensor:
    """Decodes any encoding of this module, by the codec in its header."""
    if len(data) < HEADER.size:
        raise CompressError(f"{len(data)} bytes is shorter than the {HEADER.size}-byte header")
    codec = data[0]
    if codec == CODEC_TOPK:
        return TopK().decode(data)
    if codec == CODEC_INT8:
        return Int8().decode(data)
    if codec == CODEC_SIGN:
        return Sign().decode(data)
    raise CompressError(f"unknown codec {codec}")


def parse(text: str) -> Compressor:
    """A compressor from its setting: 'topk' / 'topk:0.01', 'int8' / 'int8:256', 'sign' /
    'sign:4096' (the number is top-k's ratio or the quantizers' block)."""
    name, _, arg = text.partition(":")
    try:
        if name == "topk":
            return TopK(float(arg)) if arg else TopK()
        if name == "int8":
            return Int8(int(arg)) if arg else Int8()
        if name == "sign":
            return Sign(int(arg)) if arg else Sign()
    except ValueError as exc:
        raise ValueError(f"transport.compress {text!r}: {exc}") from None
    raise ValueError(f"transport.compress {text!r}: expected topk[:RATIO], int8[:BLOCK] or sign[:BLOCK]")
