"""The one tensor codec: 1-D tensors <-> raw little-endian bytes, in chunks.

Every byte of tensor data that crosses the wire goes through here. Senders slice a flat
tensor into chunks of at most `chunk_bytes` (no gRPC message limit is ever reached);
receivers decode each chunk straight into place in a preallocated flat tensor.

Bulk messages of the RPCs (PushRequest, InitShardRequest, PullResponse) carry one TensorChunk
each and are plain protobuf messages; the data plane (proto/dataplane.py) sends the same
elements as raw bytes.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator

import torch

from shardps.proto import common_pb2

# 1 MiB: well under gRPC's 4 MiB default, and the fastest here (bench/RESULTS.md, wire levers:
# 1 MiB moved 1.18x what 2 MiB did on 10M parameters; 256 KiB 0.77x, 4 MiB 0.81x, 8 MiB 0.73x).
DEFAULT_CHUNK_BYTES = 1024 * 1024
MIN_CHUNK_BYTES = 4 * 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024

# The largest magnitude a pushed gradient element may have; a server refuses a push with a
# larger one, as it refuses NaN and inf (`pushable`). Servers keep Adam's state in fp32, and
# its second moment v is a running mean of g*g whose weights (1 - beta2) * beta2**k sum to
# less than 1: v stays finite exactly while every g*g does, whatever the betas, i.e. while
# |g| <= sqrt(FP32_MAX) ~ 1.84e19 (the first moment, a mean of g, is then finite too).
# 2**63 ~ 9.2e18 keeps g*g a factor 4 below FP32_MAX: room for rounding, for the sync mean
# of several pushes and for L2 weight decay's weight_decay * w added to g.
MAX_GRADIENT = 2.0**63

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("shardps's wire format is little-endian; this host is big-endian")

# decode() views immutable bytes; callers only ever copy out of the view, never write to it.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# Wire dtype enum <-> torch dtype, and the spec's names for them.
TORCH_DTYPES: dict[int, torch.dtype] = {
    common_pb2.DTYPE_FLOAT32: torch.float32,
    common_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    common_pb2.DTYPE_FLOAT16: torch.float16,
}
DTYPE_NAMES: dict[str, common_pb2.DType] = {
    "float32": common_pb2.DTYPE_FLOAT32,
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
    "float16": common_pb2.DTYPE_FLOAT16,
}


class CodecError(ValueError):
    """Bytes that cannot be decoded into the destination (bad dtype, size or offset)."""


def torch_dtype(wire_dtype: int) -> torch.dtype:
    """Maps a wire DType enum value to a torch dtype; raises CodecError if unknown."""
    try:
        return TORCH_DTYPES[wire_dtype]
    except KeyError:
        raise CodecError(f"unknown wire dtype {wire_dtype}") from None


def element_size(wire_dtype: int) -> int:
    return torch_dtype(wire_dtype).itemsize


def encode(flat: torch.Tensor, wire_dtype: int) -> bytes:
    """Returns the bytes of a 1-D tensor in the wire dtype (one copy, plus a cast if needed)."""
    src = flat.detach()
    if src.device.type != "cpu":
        src = src.to("cpu", non_blocking=False)
    dtype = torch_dtype(wire_dtype)
    if src.dtype != dtype:
        src = src.to(dtype)
    return src.contiguous().view(torch.uint8).numpy().tobytes()


def decode(data: bytes | memoryview, wire_dtype: int) -> torch.Tensor:
    """Returns a read-only view of `data` as a 1-D tensor of the wire dtype (no copy)."""
    size = element_size(wire_dtype)
    if len(data) % size:
        raise CodecError(f"{len(data)} bytes is not a whole number of {size}-byte elements")
    if not data:
        return torch.empty(0, dtype=torch_dtype(wire_dtype))
    return torch.frombuffer(data, dtype=torch_dtype(wire_dtype))


def iter_chunks(
    flat: torch.Tensor, wire_dtype: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[common_pb2.TensorChunk]:
    """Yields TensorChunk messages covering a 1-D tensor, offsets relative to its start."""
    if flat.dim() != 1:
        raise CodecError(f"expected a 1-D tensor, got shape {tuple(flat.shape)}")
    step = chunk_elements(wire_dtype, chunk_bytes)
    n = flat.numel()
    for start in range(0, n, step):
        piece = flat[start : start + step]
        yield common_pb2.TensorChunk(offset=start, data=encode(piece, wire_dtype))


def chunk_elements(wire_dtype: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Elements per chunk for a requested chunk size, clamped to the allowed range."""
    chunk_bytes = min(max(int(chunk_bytes or DEFAULT_CHUNK_BYTES), MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    return max(1, chunk_bytes // element_size(wire_dtype))


def write_chunk(dest: torch.Tensor, chunk: common_pb2.TensorChunk, wire_dtype: int) -> int:
    """Decodes a chunk into dest[offset:offset+n] (casting to dest's dtype); returns n.

    Raises CodecError, leaving dest untouched, if the chunk does not fit inside dest.
    """
    values = decode(chunk.data, wire_dtype)
    n = values.numel()
    if chunk.offset < 0 or chunk.offset + n > dest.numel():
        raise CodecError(
            f"chunk [{chunk.offset}, {chunk.offset + n}) is outside a tensor of {dest.numel()} elements"
        )
    dest[chunk.offset : chunk.offset + n].copy_(values)
    return n


class ByteAssembler:
    """Receives bytes sent in consecutive chunks whose offsets count bytes (a compressed push
    body or pull delta over the RPCs), `size` bytes in all; CodecError for a chunk out of
    place or a short total. Not thread-safe: one assembler per stream."""

    def __init__(self, size: int):
        self.data = bytearray(size)
        self.received = 0

    def add(self, chunk: common_pb2.TensorChunk) -> None:
        n = len(chunk.data)
        if chunk.offset != self.received or self.received + n > len(self.data):
            raise CodecError(f"a chunk of {n} bytes at offset {chunk.offset}: expected offset "
                             f"{self.received}, {len(self.data)} bytes in all")
        self.data[self.received : self.received + n] = chunk.data
        self.received += n

    def finish(self) -> bytearray:
        if self.received != len(self.data):
            raise CodecError(f"received {self.received} of {len(self.data)} bytes")
        return self.data


class ChunkAssembler:
    """Receives chunks in offset order into a preallocated flat tensor and checks coverage.

    With `check_finite`, each chunk is also checked right after it is written, while it is
    still in cache (a separate pass over a 400 MB gradient costs about a quarter of an Adam
    step): `all_finite` says whether every value is `pushable` (finite, |x| <= MAX_GRADIENT).

    Not thread-safe: one assembler per stream.
    """

    def __init__(self, dest: torch.Tensor, wire_dtype: int, check_finite: bool = False):
        torch_dtype(wire_dtype)  # validates
        self.dest = dest
        self.wire_dtype = wire_dtype
        self.received = 0
        self.check_finite = check_finite
        self.all_finite = True

    def add(self, chunk: common_pb2.TensorChunk) -> None:
        if chunk.offset != self.received:
            raise CodecError(f"chunk at offset {chunk.offset}, expected {self.received}")
        n = write_chunk(self.dest, chunk, self.wire_dtype)
        if self.check_finite and self.all_finite and n:
            self.all_finite = pushable(self.dest[self.received : self.received + n])
        self.received += n

    @property
    def complete(self) -> bool:
        return self.received == self.dest.numel()

    def finish(self) -> torch.Tensor:
        """Returns dest, or raises CodecError if the chunks did not cover it exactly."""
        if not self.complete:
            raise CodecError(f"received {self.received} of {self.dest.numel()} elements")
        return self.dest


def finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: one read (a sum, which NaN and inf poison), and an
    elementwise check only when the sum is not finite (it may just have overflowed)."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def pushable(t: torch.Tensor) -> bool:
    """Whether every element of a 1-D gradient is finite with |x| <= MAX_GRADIENT, in one read.

    fp32: a dot product with itself at most MAX_GRADIENT**2 proves it (rounding never lowers
    a running sum of non-negative terms, so the sum is at least its largest term, and NaN and
    inf poison it); only a larger or non-finite sum takes the exact look. fp16 holds nothing
    beyond 65504, so finiteness is all there is to check. Other dtypes (bf16): min and max.
    """
    if t.numel() == 0:
        return True
    if t.dtype == torch.float16:
        return finite(t)
    if t.dtype == torch.float32 and float(torch.dot(t, t)) <= MAX_GRADIENT * MAX_GRADIENT:
        return True
    low, high = torch.aminmax(t)
    return -MAX_GRADIENT <= float(low) and float(high) <= MAX_GRADIENT
