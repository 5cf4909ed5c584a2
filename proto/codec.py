"""The one tensor codec: 1-D tensors <-> raw little-endian bytes, in chunks.

Every byte of tensor data that crosses the wire goes through here. Senders slice a flat
tensor into chunks of at most `chunk_bytes` (no gRPC message limit is ever reached);
receivers decode each chunk straight into place in a preallocated flat tensor.

Bulk messages (a PushRequest, InitShardRequest or PullResponse carrying one TensorChunk) are
written and read here byte by byte rather than through protobuf objects, which would copy
the payload into the message, again to serialize it and again to parse it: `chunk_messages`
builds each message with one copy, `message_reader` hands the payload on as a view into the
received bytes. The bytes are exactly the protobuf encoding of the .proto messages, so any
protobuf peer interoperates (tests/unit/test_codec.py checks both directions).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from google.protobuf.message import Message

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


def write_chunk(dest: torch.Tensor, chunk: common_pb2.TensorChunk | Chunk, wire_dtype: int) -> int:
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

    def add(self, chunk: common_pb2.TensorChunk | Chunk) -> None:
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


# -- bulk messages, byte by byte -----------------------------------------------------------

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types


@dataclass(frozen=True, slots=True)
class Chunk:
    """A TensorChunk read off the wire without a copy: `data` views the received message."""

    offset: int        # first element, relative to the start of the tensor
    data: memoryview   # raw little-endian elements in the message's dtype (read-only)


M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class ChunkedMessage(Generic[M]):
    """A bulk message (of type M) as `message_reader` returns it."""

    message: M          # the protobuf message with every field but its chunk
    chunk: Chunk | None  # its TensorChunk, None if it carried none


def _varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_header(field: int, offset: int, nbytes: int) -> bytes:
    """The bytes that precede `nbytes` of payload in a message whose field `field` is the
    TensorChunk {offset, data}; the payload follows directly."""
    inner = (b"\x08" + _varint_bytes(offset) if offset else b"") + b"\x12" + _varint_bytes(nbytes)
    return _varint_bytes(field << 3 | _LEN) + _varint_bytes(len(inner) + nbytes) + inner


def chunk_message(piece: torch.Tensor, wire_dtype: int, field: int, offset: int,
                  first: bytes = b"", scratch: torch.Tensor | None = None) -> bytes:
    """One serialized message carrying `piece` (a 1-D CPU tensor, cast to the wire dtype) as the
    TensorChunk {offset, data} in field `field`, after `first` (see chunk_messages).

    One copy of the payload into the message; a cast goes through `scratch` (a reusable buffer
    of the wire dtype, at least as long) when given, else a temporary.
    """
    dtype = torch_dtype(wire_dtype)
    if piece.dtype != dtype:
        target = scratch[: piece.numel()] if scratch is not None else torch.empty(piece.numel(), dtype=dtype)
        piece = target.copy_(piece)
    elif not piece.is_contiguous():
        piece = piece.contiguous()
    payload = piece.view(torch.uint8).numpy().data  # a memoryview of the tensor's bytes
    return b"".join((first, chunk_header(field, offset, payload.nbytes), payload))


def chunk_messages(flat: torch.Tensor, wire_dtype: int, field: int,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, first: bytes = b"") -> Iterator[bytes]:
    """Serialized messages covering a 1-D tensor, each carrying one chunk in field `field`.

    Each message costs one copy of its payload (plus the cast, into a reused scratch buffer,
    when the wire dtype differs). `first`, a serialized message of the same type (a header),
    is merged into the first message; protobuf parses concatenated messages as one. An empty
    tensor yields just `first`, if any.
    """
    if flat.dim() != 1:
        raise CodecError(f"expected a 1-D tensor, got shape {tuple(flat.shape)}")
    dtype = torch_dtype(wire_dtype)
    src = flat.detach()
    if src.device.type != "cpu":
        src = src.cpu()
    step = chunk_elements(wire_dtype, chunk_bytes)
    n = src.numel()
    if n == 0:
        if first:
            yield first
        return
    scratch = None if src.dtype == dtype else torch.empty(min(step, n), dtype=dtype)
    for start in range(0, n, step):
        yield chunk_message(src[start : start + step], wire_dtype, field, start, first, scratch)
        first = b""


class _Unusual(Exception):
    """Bytes the fast reader leaves to protobuf (repeated or unknown chunk fields, groups)."""


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]  # IndexError when truncated
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Unusual


def _read_chunk(buf: memoryview) -> Chunk:
    offset, data, pos = None, None, 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        if tag == 0x08 and offset is None:
            offset, pos = _read_varint(buf, pos)
            if offset >= 1 << 64:
                raise _Unusual
            if offset >= 1 << 63:
                offset -= 1 << 64
        elif tag == 0x12 and data is None:
            size, pos = _read_varint(buf, pos)
            data = buf[pos : pos + size]
            pos += size
        else:
            raise _Unusual
    if pos != len(buf):
        raise _Unusual
    return Chunk(offset or 0, data if data is not None else memoryview(b""))


def _split(data: bytes, field: int) -> tuple[list[memoryview], Chunk | None]:
    """The spans of every top-level field but `field`, and `field` read as a TensorChunk."""
    buf = memoryview(data)
    spans: list[memoryview] = []
    chunk = None
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            if number == field:
                if chunk is not None or pos + size > end:
                    raise _Unusual
                chunk = _read_chunk(buf[pos : pos + size])
                pos += size
                continue
            pos += size
        else:
            raise _Unusual
        if pos > end:
            raise _Unusual
        spans.append(buf[start:pos])
    return spans, chunk


def message_reader(cls: type[M], field_name: str = "chunk") -> Callable[[bytes], ChunkedMessage[M]]:
    """A gRPC deserializer for messages of type `cls` whose field `field_name` is a TensorChunk.

    The chunk's payload stays in the received bytes (a view, no copy); the other fields are
    parsed by protobuf. Anything the fast path does not expect goes through protobuf whole,
    so the result is always what protobuf would parse, and bytes protobuf rejects raise.
    """
    field = cls.DESCRIPTOR.fields_by_name[field_name].number

    def read(data: bytes) -> ChunkedMessage[M]:
        try:
            spans, chunk = _split(data, field)
        except (_Unusual, IndexError):
            return _read_slowly(cls, field_name, data)
        message = cls.FromString(b"".join(spans)) if spans else cls()
        return ChunkedMessage(message, chunk)

    return read


def _read_slowly(cls: type[M], field_name: str, data: bytes) -> ChunkedMessage[M]:
    message = cls.FromString(data)
    if not message.HasField(field_name):
        return ChunkedMessage(message, None)
    chunk = getattr(message, field_name)
    found = Chunk(chunk.offset, memoryview(chunk.data))
    message.ClearField(field_name)
    return ChunkedMessage(message, found)


def serialized(message: Message | bytes) -> bytes:
    """A gRPC serializer for streams that mix protobuf messages and `chunk_messages` bytes."""
    return message if isinstance(message, bytes) else message.SerializeToString()
