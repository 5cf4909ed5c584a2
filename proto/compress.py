"""Lossy wire forms of a flat fp32 tensor: top-k sparsification, int8 with a scale per block,
and 1-bit sign with a scale per block. The contract for compressed pushes and pull deltas.

Every encoded tensor is one self-describing byte string: a 16-byte header, then the body.

  header  <B B H I Q>  codec (CODEC_*), index width in bytes (top-k: 4 or 8, else 0),
                       reserved (0), k (top-k) or block (int8, sign), numel
  top-k   k indices (int32, or int64 when numel >= 2**31), ascending, then k fp32 values
  int8    ceil(numel / block) fp32 scales, then numel int8 codes: x ~= code * scale
  sign    ceil(numel / block) fp32 scales, then ceil(numel / 8) bytes of sign bits, bit i of
          byte j for element 8j + i (1: >= 0, 0: < 0): x ~= +-scale

`size(numel)` is the exact length of `encode` for a tensor of numel elements; `decode`
returns a fresh dense fp32 tensor, `decode_into` writes or adds into one. Encoding is
deterministic (no randomness, ties in top-k broken towards the lower index), so a sender and
a receiver that both decode agree bitwise. `encode_feedback(x)` is `encode(x)` that also
leaves `x - decode(encoding)` in x, bitwise, without a second pass (error feedback's
residual), and `encode_delta(target, held, out=None)` is `encode(target - held)` that also
writes held plus its decode into out, or adds it to held (a pull delta against the copy a
worker holds). The quantizers work a chunk of CHUNK elements at a time, so each pass over
it runs in cache: on 50M elements and one core, error feedback with int8 took 0.32 s against
1.27 s for whole-tensor passes, with sign 0.19 s against 1.85 s. Top-k selects in linear
time (a partition) instead of sorting. A block larger than the tensor is one block of the
tensor's size (the same scale), so no block is ever padded beyond the data.
"""

from __future__ import annotations

import torch

from shardps.proto import ps_pb2
from shardps.proto.codecbase import (
    CHUNK,
    CODEC_INT8,
    CODEC_SIGN,
    CODEC_TOPK,
    HEADER,
    INT32_LIMIT,
    MAX_BLOCK,
    CompressError,
    Compressor,
)
from shardps.proto.quantize import Int8, Sign
from shardps.proto.topk import TopK

__all__ = ["CHUNK", "CODEC_INT8", "CODEC_SIGN", "CODEC_TOPK", "HEADER", "INT32_LIMIT", "MAX_BLOCK",
           "PUSH_COMPRESSIONS", "CompressError", "Compressor", "Int8", "Sign", "TopK", "codec_of", "decode",
           "decode_into", "decode_landed", "max_size", "numel_of", "parse"]

# A compressed push's header names its codec (PushHeader.compression, ps.proto): the same numbers.
PUSH_COMPRESSIONS: dict[int, ps_pb2.PushCompression] = {
    CODEC_TOPK: ps_pb2.PUSH_COMPRESSION_TOPK,
    CODEC_INT8: ps_pb2.PUSH_COMPRESSION_INT8,
    CODEC_SIGN: ps_pb2.PUSH_COMPRESSION_SIGN,
}


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


def _reader(data: bytes | memoryview) -> Compressor:
    """The codec that reads data, by the number in its header."""
    if len(data) < HEADER.size:
        raise CompressError(f"{len(data)} bytes is shorter than the {HEADER.size}-byte header")
    codec = data[0]
    if codec == CODEC_TOPK:
        return TopK()
    if codec == CODEC_INT8:
        return Int8()
    if codec == CODEC_SIGN:
        return Sign()
    raise CompressError(f"unknown codec {codec}")


def decode(data: bytes | memoryview) -> torch.Tensor:
    """Decodes any encoding of this module, by the codec in its header."""
    return _reader(data).decode(data)


def decode_into(data: bytes | memoryview, out: torch.Tensor, add: bool = False) -> None:
    """Decodes any encoding of this module into out (1-D fp32 of its numel), or adds it to
    out; checks everything before it writes, so a CompressError leaves out as it was."""
    _reader(data).decode_into(data, out, add=add)


def decode_landed(data: bytes | memoryview, landed: int, out: torch.Tensor, done: int,
                  add: bool = False) -> int:
    """`decode_into` as an encoding arrives: `data` is a buffer of its full size whose first
    `landed` bytes are in, `done` elements of it are in out already; decodes what more it can
    (int8 and sign: whole chunks whose bytes are in; top-k: all of it once every byte is in)
    and returns the elements decoded in all. Call it once the header's 16 bytes are in: every
    call checks the codec, int8 and sign their header and size too, top-k the rest once all is
    in, so a CompressError comes before any write."""
    reader = _reader(data)
    if isinstance(reader, Int8 | Sign):
        return reader.decode_landed(data, landed, out, done, add=add)
    if landed < len(data):
        return done
    reader.decode_into(data, out, add=add)
    return out.numel()


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
