"""The codecs' chunked passes (proto/compress.py) against the formats' definitions written
out whole-tensor: the same bytes, the same decode, and encode_feedback / encode_delta /
decode_into bitwise what encode and decode imply, across chunk boundaries, short last
blocks, zeros of both signs, and blocks larger than a chunk."""

import math

import numpy as np
import pytest
import torch

from shardps.proto import compress


def _reference(comp, x: torch.Tensor) -> bytes:
    """The encoding as the format defines it, whole tensor at once (a block larger than the
    tensor is the tensor: summed over its own elements, not over padding)."""
    n, block = x.numel(), min(comp.block, x.numel()) or comp.block
    pad = torch.nn.functional.pad(x, (0, -n % block)).view(-1, block)
    if isinstance(comp, compress.Int8):
        scales = pad.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        body = (pad / safe[:, None]).round().clamp(-127, 127).to(torch.int8).view(-1)[:n].numpy().tobytes()
    else:
        counts = torch.tensor([min(block, n - b * block) for b in range(pad.shape[0])], dtype=torch.float32)
        scales = pad.abs().sum(dim=1) / counts
        body = np.packbits(x.numpy() >= 0, bitorder="little").tobytes()
    return compress.HEADER.pack(comp.codec, 0, 0, comp.block, n) + scales.numpy().tobytes() + body


def _reference_decode(data: bytes) -> torch.Tensor:
    _, _, _, block, n = compress.HEADER.unpack_from(data)
    block = min(block, n) or block
    nblocks = math.ceil(n / block)
    scales = torch.from_numpy(np.frombuffer(data, np.float32, count=nblocks, offset=16).copy())
    per_element = scales.repeat_interleave(block)[:n]
    payload = np.frombuffer(data, np.uint8, offset=16 + 4 * nblocks)
    if data[0] == compress.CODEC_INT8:
        return torch.from_numpy(payload.view(np.int8).astype(np.float32)) * per_element
    signs = torch.from_numpy(np.unpackbits(payload, count=n, bitorder="little").astype(np.float32)) * 2 - 1
    return signs * per_element


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


SIZES = [0, 1, 7, 9, 255, 257, compress.CHUNK - 1, compress.CHUNK + 3, 3 * compress.CHUNK + 4097]
CODECS = [compress.Int8(256), compress.Int8(3), compress.Sign(4096), compress.Sign(100), compress.Sign(3),
          compress.Int8(compress.CHUNK * 2), compress.Sign(compress.CHUNK + 8)]


def _input(n: int) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    x[::5] = 0.0
    x[1::11] = -0.0
    return x


@pytest.fixture
def one_thread():
    """A reduction over a single long block may split across threads (then its float sum
    differs in the last bits from a serial one's): these compare bits, so one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("comp", CODECS, ids=lambda c: f"{c.name}{c.block}")
@pytest.mark.parametrize("n", SIZES)
def test_chunked_passes_are_the_whole_tensor_definition_bitwise(comp, n, one_thread):
    x = _input(n)
    data = comp.encode(x)
    assert data == _reference(comp, x)
    decoded = comp.decode(data)
    assert torch.equal(_bits(decoded), _bits(_reference_decode(data)))
    owed = x.clone()
    assert comp.encode_feedback(owed) == data
    assert torch.equal(_bits(owed), _bits(x - decoded))
    base = torch.randn(n)
    added = base.clone()
    compress.decode_into(data, added, add=True)
    assert torch.equal(_bits(added), _bits(base + decoded))
    held = torch.randn(n)
    mirror = held.clone()
    assert comp.encode_delta(x, mirror) == comp.encode(x - held)
    assert torch.equal(_bits(mirror), _bits(held + comp.decode(comp.encode(x - held))))
    fresh = torch.empty(n)
    assert comp.encode_delta(x, held, out=fresh) == comp.encode(x - held)
    assert torch.equal(_bits(fresh), _bits(mirror))


def test_topk_feedback_and_delta_zero_what_was_sent_and_keep_ties_to_the_lower_index():
    x = torch.tensor([0.5, -2.0, 2.0, 0.1, -2.0, 0.0, 1.0])
    comp = compress.TopK(3 / 7)
    data = comp.encode(x)
    assert torch.equal(comp.decode(data), torch.tensor([0.0, -2.0, 2.0, 0.0, -2.0, 0.0, 0.0]))
    owed = x.clone()
    assert comp.encode_feedback(owed) == data
    assert torch.equal(owed, torch.tensor([0.5, 0.0, 0.0, 0.1, 0.0, 0.0, 1.0]))
    fresh, held = torch.empty(7), torch.ones(7)
    assert comp.encode_delta(x, held, out=fresh) == comp.encode(x - 1)
    assert torch.equal(held, torch.ones(7)) and torch.equal(fresh, 1 + comp.decode(comp.encode(x - 1)))
    assert comp.encode_delta(x, held) == comp.encode(x - 1)
    assert torch.equal(held, 1 + comp.decode(comp.encode(x - 1)))
    ties = compress.TopK(0.5).decode(compress.TopK(0.5).encode(torch.ones(6)))
    assert torch.equal(ties, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("comp", [compress.Int8(64), compress.Sign(64), compress.TopK(0.5)], ids=lambda c: c.name)
def test_decode_into_checks_everything_before_it_writes(comp):
    data = comp.encode(torch.randn(100))
    out = torch.full((100,), 7.0)
    for bad, match in ((data[:-1], "the header says"), (data, "into a torch.float32 tensor of shape \\(99,\\)")):
        target = out if bad is not data else out[:99]
        with pytest.raises(compress.CompressError, match=match):
            compress.decode_into(bad, target, add=True)
    with pytest.raises(compress.CompressError, match="into a torch.float64 tensor"):
        comp.decode_into(data, torch.zeros(100, dtype=torch.float64))
    assert torch.equal(out, torch.full((100,), 7.0))
    with pytest.raises(compress.CompressError, match="contiguous 1-D float32"):
        comp.encode_feedback(torch.randn(200)[::2])


@pytest.mark.parametrize("codec", [compress.Int8, compress.Sign], ids=lambda c: c.__name__)
def test_a_block_larger_than_the_tensor_is_one_block_and_never_padded(codec):
    """A header (a stranger's push) or a setting naming a 4-billion-element block for 1000
    elements decodes as one block of 1000, without a 16 GB padded temporary."""
    x = _input(1000)
    huge = codec(compress.MAX_BLOCK)
    data = huge.encode(x)
    assert compress.HEADER.unpack_from(data)[3] == compress.MAX_BLOCK  # the setting, as sent
    assert torch.equal(compress.decode(data), codec(1000).decode(codec(1000).encode(x)))
    owed = x.clone()
    huge.encode_feedback(owed)
    assert torch.equal(owed, x - compress.decode(data))


def test_topk_of_a_tensor_with_nan_is_still_a_well_formed_encoding():
    """The server refuses a push whose decode is not finite; the encoding must still hold
    exactly k entries, so that refusal is about the values, not a malformed body."""
    x = _input(1000)
    x[[3, 500]] = float("nan")
    comp = compress.TopK(0.1)
    data = comp.encode(x)
    assert len(data) == comp.size(1000)
    assert int(comp.decode(data).isnan().sum()) == 2


@pytest.mark.parametrize("setting", ["int8", "int8:3", "sign", "sign:32", "sign:1", "topk:0.1"])
@pytest.mark.parametrize("n", [1, 1000, 3 * compress.CHUNK + 5])
@pytest.mark.parametrize("add", [False, True])
def test_decoding_as_the_bytes_land_gives_the_bits_of_decoding_them_whole(setting, n, add):
    """decode_landed, fed a buffer that fills up in uneven steps (as a socket fills it),
    decodes a growing prefix and ends with decode_into's bits; it never reports elements
    whose bytes are not in (each prefix it reports is already final)."""
    comp = compress.parse(setting)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    data = comp.encode(x)
    start = torch.randn(n, generator=gen)
    whole = start.clone()
    compress.decode_into(data, whole, add=add)
    out, buf, done, landed = start.clone(), bytearray(len(data)), 0, 0
    rng = np.random.default_rng(n)
    while landed < len(data):
        step = max(compress.HEADER.size, int(rng.integers(1, max(2, len(data) // 5))))
        buf[landed : landed + step] = data[landed : landed + step]
        landed = min(len(data), landed + step)
        now = compress.decode_landed(memoryview(buf), landed, out, done, add=add)
        assert done <= now <= n
        assert torch.equal(out[:now], whole[:now]) and torch.equal(out[now:], start[now:])
        done = now
    assert done == n and torch.equal(out, whole)


def test_decoding_as_the_bytes_land_refuses_a_bad_header_before_writing():
    data = bytearray(compress.parse("sign").encode(torch.randn(5000)))
    out = torch.zeros(5000)
    with pytest.raises(compress.CompressError, match="elements"):
        compress.decode_landed(memoryview(data), len(data), torch.zeros(4999), 0)
    data[0] = 9
    with pytest.raises(compress.CompressError, match="unknown codec"):
        compress.decode_landed(memoryview(data), 16, out, 0)
    assert not out.any()
