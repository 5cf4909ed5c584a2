"""Compressed pushes on the server (PushHeader fields 30-39): what the header must declare,
and the decode of the body into the shard's fp32 staging buffer. The decoding is
proto/compress.py's, the same the worker's error feedback subtracts, so the server applies
exactly what the worker accounted as sent.

No gRPC, no sockets. Both transports read the body's bytes their own way: the data plane
from its socket through `receive_into`, which decodes each piece as it lands; the Push RPC
from its chunks (`BodyAssembler`), then `decode_into`. Every error is an InvalidPushError
(reason "bad_encoding"), raised before the shard changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardps.proto import codec, common_pb2, compress, dataplane, ps_pb2

from .errors import InvalidPushError

REASON = "bad_encoding"
# A header's compression value -> the codec number its encoding must carry (the same numbers).
_CODECS = {int(wire): number for number, wire in compress.PUSH_COMPRESSIONS.items()}


def is_compressed(header: ps_pb2.PushHeader) -> bool:
    return header.compression != ps_pb2.PUSH_COMPRESSION_NONE


def _refuse(message: str) -> InvalidPushError:
    return InvalidPushError(f"compressed push: {message}", REASON)


def check_header(header: ps_pb2.PushHeader) -> int:
    """The byte length of a compressed push's body, once the header's compression and
    compressed_bytes are ones to read (a known codec; at most compress.max_size(length))."""
    if header.compression not in _CODECS:
        raise _refuse(f"unknown compression {header.compression}")
    limit = compress.max_size(max(header.length, 0))
    if not compress.HEADER.size <= header.compressed_bytes <= limit:
        raise _refuse(f"compressed_bytes {header.compressed_bytes} is outside "
                      f"[{compress.HEADER.size}, {limit}] for {header.length} elements")
    return header.compressed_bytes


def body_bytes(header: ps_pb2.PushHeader) -> int:
    """Bytes that follow a push header on the data plane; -1 when the header cannot say."""
    if is_compressed(header):
        return header.compressed_bytes if header.compression in _CODECS else -1
    try:
        elements = header.length * codec.element_size(header.dtype)
    except codec.CodecError:
        return -1
    return elements + header.pieces * dataplane.PIECE.size  # an overlapped push's heads


def staging_dtype(header: ps_pb2.PushHeader) -> torch.dtype:
    """The dtype a push is staged in: fp32 for a compressed one (what decoding yields), else
    its wire dtype. Raises codec.CodecError for an unknown dtype."""
    if is_compressed(header):
        return torch.float32
    return codec.torch_dtype(header.dtype)


def decode_into(header: ps_pb2.PushHeader, data: bytes | bytearray,
                grad: torch.Tensor) -> tuple[int, bool]:
    """Decodes the body into grad (fp32, the shard's length): (bytes received, whether every
    value is codec.pushable). Raises InvalidPushError, grad then undefined (staging)."""
    view = memoryview(data)
    _decode_landed(header, view, len(view), grad, 0)
    return len(data), codec.pushable(grad)


def receive_into(header: ps_pb2.PushHeader, read: Callable[[memoryview], None],
                 grad: torch.Tensor) -> tuple[int, bool]:
    """`decode_into` of a body read with read(view) (fills view or raises), decoded piece by
    piece as it lands (dataplane.recv_decoding: the whole body is read even after a refusal,
    which is raised then)."""
    size = header.compressed_bytes  # at least the 16-byte header: check_header
    dataplane.recv_decoding(read, size, lambda body, landed, done: _decode_landed(header, body, landed, grad, done))
    return size, codec.pushable(grad)


def _decode_landed(header: ps_pb2.PushHeader, view: memoryview, landed: int,
                   grad: torch.Tensor, done: int) -> int:
    codec_number = _CODECS.get(header.compression)
    try:
        got = compress.codec_of(view)
        if got != codec_number:
            raise _refuse(f"the encoding's codec is {got}, the header says {codec_number}")
        numel = compress.numel_of(view)
        if numel != grad.numel():
            raise _refuse(f"the encoding holds {numel} elements, the shard {grad.numel()}")
        return compress.decode_landed(view, landed, grad, done)
    except compress.CompressError as exc:
        raise _refuse(str(exc)) from None


class BodyAssembler(codec.ByteAssembler):
    """A compressed body from the Push RPC's chunks (codec.ByteAssembler), its errors refused
    as a bad encoding. Not thread-safe: one per stream."""

    def add(self, chunk: common_pb2.TensorChunk) -> None:
        try:
            super().add(chunk)
        except codec.CodecError as exc:
            raise _refuse(str(exc)) from None

    def finish(self) -> bytearray:
        try:
            return super().finish()
        except codec.CodecError as exc:
            raise _refuse(str(exc)) from None
