"""What every lossy wire form of proto/compress.py shares: the 16-byte header, the codec
numbers, the Compressor protocol, and the checks and buffer views the codecs build on."""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from typing import Protocol

import torch

# Decoding views immutable bytes and only reads them (as the codec does).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

HEADER = struct.Struct("<BBHIQ")
CODEC_TOPK = 1  # k largest magnitudes, as (index, value) pairs
CODEC_INT8 = 2  # symmetric int8, scale = max |x| / 127 per block
CODEC_SIGN = 3  # one bit per element, scale = mean |x| per block
INT32_LIMIT = 2**31
MAX_BLOCK = 2**32 - 1
CHUNK = 1 << 17  # elements the quantizers work on at a time: 512 KiB of fp32, in a core's cache


class CompressError(ValueError):
    """A byte string that is not an encoding these codecs wrote (bad header or length)."""


class Compressor(Protocol):
    """A lossy codec for 1-D fp32 tensors; stateless, so one instance serves every thread."""

    @property
    def name(self) -> str: ...

    def encode(self, flat: torch.Tensor) -> bytes: ...

    def encode_feedback(self, flat: torch.Tensor, fill: Callable[[int, int], None] | None = None) -> bytes: ...

    def encode_delta(self, target: torch.Tensor, held: torch.Tensor, out: torch.Tensor | None = None) -> bytes: ...

    def decode(self, data: bytes | memoryview) -> torch.Tensor: ...

    def decode_into(self, data: bytes | memoryview, out: torch.Tensor, add: bool = False) -> None: ...

    def size(self, numel: int) -> int: ...


def check_flat(flat: torch.Tensor) -> torch.Tensor:
    if flat.dim() != 1 or flat.dtype != torch.float32:
        raise CompressError(f"expected a 1-D float32 tensor, got {flat.dtype} {tuple(flat.shape)}")
    return flat.detach().contiguous()


def read_header(data: bytes | memoryview, codec: int) -> tuple[int, int, int]:
    """(index width, k or block, numel) of data, after checking its codec."""
    if len(data) < HEADER.size:
        raise CompressError(f"{len(data)} bytes is shorter than the {HEADER.size}-byte header")
    got, width, _, param, numel = HEADER.unpack_from(data)
    if got != codec:
        raise CompressError(f"codec {got} in the header, expected {codec}")
    return width, param, numel


def body_of(data: bytes | memoryview, size: int) -> memoryview:
    if len(data) != size:
        raise CompressError(f"{len(data)} bytes, the header says {size}")
    return memoryview(data)[HEADER.size:]


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def frombuffer(buf: memoryview | bytearray, dtype: torch.dtype, count: int, offset: int,
                copy: bool = True) -> torch.Tensor:
    """count elements of buf from offset: a copy, or (copy=False) a view, which is writable
    only over a bytearray."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    view = torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return view.clone() if copy else view


def check_inplace(flat: torch.Tensor) -> torch.Tensor:
    """flat, which encode_feedback overwrites with what is still owed: 1-D, fp32, contiguous."""
    if flat.dim() != 1 or flat.dtype != torch.float32 or not flat.is_contiguous():
        raise CompressError(f"expected a contiguous 1-D float32 tensor, got {flat.dtype} {tuple(flat.shape)}")
    return flat.detach()


def check_held(held: torch.Tensor, numel: int) -> torch.Tensor:
    """held, which encode_delta adds the decode to: contiguous 1-D fp32 of numel elements."""
    check_inplace(held)
    check_out(held, numel)
    return held


def check_out(out: torch.Tensor, numel: int) -> None:
    if out.dim() != 1 or out.dtype != torch.float32 or out.numel() != numel:
        raise CompressError(f"an encoding of {numel} elements into a {out.dtype} tensor of shape "
                            f"{tuple(out.shape)}")


def as_blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """flat as (blocks, block), the last block padded with zeros."""
    pad = -flat.numel() % block
    if not pad:  # a view: padding copies the whole tensor
        return flat.view(-1, block)
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)


def check_block(block: int) -> None:
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be in [1, {MAX_BLOCK}], got {block}")


def check_header_block(block: int) -> None:
    if block < 1:
        raise CompressError("block 0 in the header")
