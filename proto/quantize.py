"""The block quantizers of proto/compress.py, `int8` and `sign`: a scale per block, then a
payload of 8 or 1 bits an element, worked a chunk of CHUNK elements at a time."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from shardps.proto.codecbase import (
    CHUNK,
    CODEC_INT8,
    CODEC_SIGN,
    HEADER,
    as_blocks,
    body_of,
    check_block,
    check_flat,
    check_header_block,
    check_held,
    check_inplace,
    check_out,
    frombuffer,
    read_header,
)


class _Blockwise(ABC):
    """The quantizers' common shape: a scale per block of `block` elements, then a payload
    of `bits` per element, worked through CHUNK elements at a time (whole blocks, whole
    payload bytes), so each pass over a chunk runs in cache and no temporary is as large as
    the tensor. Subclasses give the codec number and a chunk's encode and decode."""

    codec: int
    bits: int
    block: int

    def __post_init__(self) -> None:  # the dataclasses' __init__ calls it
        check_block(self.block)

    def size(self, numel: int) -> int:
        return HEADER.size + 4 * math.ceil(numel / self.block) + math.ceil(numel * self.bits / 8)

    @abstractmethod
    def _encode_chunk(self, blocks: torch.Tensor, count: int, scales: torch.Tensor,
                      payload: np.ndarray, start: int, decoded: bool) -> torch.Tensor | None:
        """Writes one chunk's scales and payload (blocks: the chunk as (blocks, block), the
        last padded); returns its decode in that shape if `decoded`."""

    @abstractmethod
    def _decode_chunk(self, block: int, scales: torch.Tensor, payload: np.ndarray, start: int,
                      count: int) -> torch.Tensor:
        """One chunk's values as (blocks, block), from its scales and the whole payload."""

    def _encode(self, flat: torch.Tensor, feedback: bool = False,
                mirror: tuple[torch.Tensor, torch.Tensor] | None = None,
                fill: Callable[[int, int], None] | None = None) -> bytes:
        """Encodes flat; with feedback, leaves flat minus the decode in flat; with a mirror
        (held, out), encodes flat - held and writes held plus the decode into out (which may
        be held). fill(start, stop), if given, prepares flat[start:stop] just before its chunk."""
        n = flat.numel()
        block = _effective(self.block, n)
        nblocks = math.ceil(n / block)
        data = bytearray(self.size(n))
        HEADER.pack_into(data, 0, self.codec, 0, 0, self.block, n)
        scales = frombuffer(data, torch.float32, nblocks, HEADER.size, copy=False)
        payload = np.frombuffer(data, np.uint8, offset=HEADER.size + 4 * nblocks)
        step = _chunk_step(block)
        for start in range(0, n, step):
            if fill is not None:
                fill(start, min(n, start + step))
            x = flat[start : start + step]
            if mirror is not None:
                x = x - mirror[0][start : start + step]
            first = start // block
            decoded = self._encode_chunk(as_blocks(x, block), x.numel(),
                                         scales[first : first + math.ceil(x.numel() / block)], payload, start,
                                         decoded=feedback or mirror is not None)
            if decoded is None:
                continue
            values = decoded.view(-1)[: x.numel()]
            if mirror is not None:
                torch.add(mirror[0][start : start + step], values, out=mirror[1][start : start + step])
            else:
                x.sub_(values)
        return bytes(data)

    def encode(self, flat: torch.Tensor) -> bytes:
        return self._encode(check_flat(flat), feedback=False)

    def encode_feedback(self, flat: torch.Tensor, fill: Callable[[int, int], None] | None = None) -> bytes:
        return self._encode(check_inplace(flat), feedback=True, fill=fill)

    def encode_delta(self, target: torch.Tensor, held: torch.Tensor, out: torch.Tensor | None = None) -> bytes:
        held = check_held(held, target.numel())
        return self._encode(check_flat(target),
                            mirror=(held, held if out is None else check_held(out, target.numel())))

    def _parts(self, data: bytes | memoryview) -> tuple[int, int, torch.Tensor, np.ndarray]:
        """(numel, block, scales, payload) of a checked encoding, viewing data."""
        _, block, n = read_header(data, self.codec)
        check_header_block(block)
        block = _effective(block, n)
        nblocks = math.ceil(n / block)
        body = body_of(data, HEADER.size + 4 * nblocks + math.ceil(n * self.bits / 8))
        scales = frombuffer(body, torch.float32, nblocks, 0, copy=False)
        return n, block, scales, np.frombuffer(body, np.uint8, offset=4 * nblocks)

    def decode(self, data: bytes | memoryview) -> torch.Tensor:
        parts = self._parts(data)
        out = torch.empty(parts[0], dtype=torch.float32)
        self._decode(*parts, out, add=False)
        return out

    def decode_into(self, data: bytes | memoryview, out: torch.Tensor, add: bool = False) -> None:
        parts = self._parts(data)
        check_out(out, parts[0])
        self._decode(*parts, out, add=add)

    def decode_landed(self, data: bytes | memoryview, landed: int, out: torch.Tensor, done: int,
                      add: bool = False) -> int:
        """`decode_into` of an encoding still arriving into `data` (a buffer of its full
        size), of which the first `landed` bytes are in and the first `done` elements decoded
        already: decodes the whole chunks after those whose bytes are in (the scales all come
        first, then the payload in element order) and returns the elements decoded now. The
        header and size are checked at every call, so the first (once the header is in)
        raises before anything is written."""
        n, block, scales, payload = self._parts(data)
        check_out(out, n)
        if landed >= len(data):
            ready = n
        else:  # elements whose payload bytes are all in, in whole chunks
            arrived = max(0, landed - (len(data) - payload.size)) * 8 // self.bits
            ready = min(n, arrived - arrived % _chunk_step(block))
        if ready > done:
            self._decode(n, block, scales, payload, out, add, done, ready)
        return max(done, ready)

    def _decode(self, n: int, block: int, scales: torch.Tensor, payload: np.ndarray,
                out: torch.Tensor, add: bool, lo: int = 0, hi: int | None = None) -> None:
        """Elements [lo, hi) (default all; lo on a chunk's start) into out, or added there."""
        step = _chunk_step(block)
        for start in range(lo, n if hi is None else hi, step):
            count = min(step, n - start)
            first = start // block
            values = self._decode_chunk(block, scales[first : first + math.ceil(count / block)], payload,
                                        start, count).view(-1)[:count]
            target = out[start : start + count]
            if add:
                target.add_(values)
            else:
                target.copy_(values)


def _effective(block: int, numel: int) -> int:
    """The block a tensor of numel elements is worked in: a block at least as large as the
    tensor is the tensor (one scale either way), never a padded giant."""
    return min(block, numel) if numel else block


def _chunk_step(block: int) -> int:
    """A quantizer's chunk: whole blocks and whole payload bytes, about CHUNK elements."""
    unit = math.lcm(block, 8)
    return unit * max(1, CHUNK // unit)


@dataclass(frozen=True)
class Int8(_Blockwise):
    """Symmetric int8 per block of `block` elements: code = round(x / scale), |code| <= 127."""

    block: int = 256
    name: str = "int8"
    codec = CODEC_INT8
    bits = 8

    def _encode_chunk(self, blocks: torch.Tensor, count: int, scales: torch.Tensor,
                      payload: np.ndarray, start: int, decoded: bool) -> torch.Tensor | None:
        chunk_scales = blocks.abs().amax(dim=1).div_(127.0)
        scales.copy_(chunk_scales)
        safe = torch.where(chunk_scales > 0, chunk_scales, 1.0)
        codes = blocks.div(safe[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        payload[start : start + count] = codes.view(-1)[:count].view(torch.uint8).numpy()
        if not decoded:
            return None
        return codes.float().mul_(chunk_scales[:, None])  # what decoding gives (-0.0 codes are 0)

    def _decode_chunk(self, block: int, scales: torch.Tensor, payload: np.ndarray, start: int,
                      count: int) -> torch.Tensor:
        codes = torch.frombuffer(payload, dtype=torch.int8, count=count, offset=start).float()
        return as_blocks(codes, block).mul_(scales[:, None])


@dataclass(frozen=True)
class Sign(_Blockwise):
    """One bit per element (its sign) and, per block, the mean magnitude as the scale."""

    block: int = 4096
    name: str = "sign"
    codec = CODEC_SIGN
    bits = 1

    def _encode_chunk(self, blocks: torch.Tensor, count: int, scales: torch.Tensor,
                      payload: np.ndarray, start: int, decoded: bool) -> torch.Tensor | None:
        block = blocks.shape[1]
        chunk_scales = blocks.abs().sum(dim=1)
        if count % block:  # the tensor's last block is short: its mean over what it holds
            chunk_scales[:-1].div_(float(block))
            chunk_scales[-1:].div_(float(count % block))
        else:
            chunk_scales.div_(float(block))
        scales.copy_(chunk_scales)
        # numpy's comparison and bit packing: torch's comparisons run ~15x slower here
        bits = np.packbits(np.greater_equal(blocks.view(-1)[:count].numpy(), 0), bitorder="little")
        payload[start // 8 : start // 8 + bits.size] = bits
        return _signs(bits, count, block, chunk_scales) if decoded else None

    def _decode_chunk(self, block: int, scales: torch.Tensor, payload: np.ndarray, start: int,
                      count: int) -> torch.Tensor:
        return _signs(payload[start // 8 : (start + count + 7) // 8], count, block, scales)


# Row b: the signs (+1.0 for a 1 bit, -1.0 for a 0) of the 8 elements byte b packs, bit 0 first.
_PLUS_MINUS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                            bitorder="little").astype(np.float32) * 2 - 1


def _signs(packed: np.ndarray, count: int, block: int, scales: torch.Tensor) -> torch.Tensor:
    """+scale where a bit of `packed` is 1, -scale where 0, for its first count bits, as
    (blocks, block): +-1 * scale, exact. The +-1 come a byte at a time from _PLUS_MINUS (on 12.5M
    elements a decode-add 13.3 -> 10.0 ms against unpacking the bits and computing 2 bit - 1)."""
    signs = torch.from_numpy(np.take(_PLUS_MINUS, packed, axis=0).reshape(-1)[:count])
    return as_blocks(signs, block).mul_(scales[:, None])
