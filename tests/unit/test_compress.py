"""Wire forms of proto/compress.py: exact sizes, round trips, and refusals of bad bytes."""

import math

import pytest
import torch

from shardps.proto import compress

COMPRESSORS = [compress.TopK(0.1), compress.Int8(64), compress.Sign(100)]


@pytest.mark.parametrize("comp", COMPRESSORS, ids=lambda c: c.name)
@pytest.mark.parametrize("numel", [0, 1, 7, 64, 1000, 4097])
def test_encoding_is_exactly_size_bytes_and_decodes_to_the_same_shape(comp, numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    data = comp.encode(x)
    assert len(data) == comp.size(numel)
    out = comp.decode(data)
    assert out.dtype == torch.float32 and out.shape == (numel,)
    assert torch.equal(compress.decode(data), out)


def test_sizes_are_the_documented_formulas():
    n = 10_000
    assert compress.TopK(0.01).size(n) == 16 + 100 * (4 + 4)
    assert compress.Int8(256).size(n) == 16 + 4 * math.ceil(n / 256) + n
    assert compress.Sign(4096).size(n) == 16 + 4 * 3 + n // 8
    # fp32 is 4 bytes an element: int8 is ~3.9x smaller, sign ~32x, top-1% ~50x.
    assert 4 * n / compress.Sign(4096).size(n) > 31


def test_topk_keeps_exactly_the_largest_magnitudes_and_zeroes_the_rest():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, -0.05, 0.01, 2.5])
    out = compress.TopK(0.3).decode(compress.TopK(0.3).encode(x))
    assert torch.equal(out, torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0]))


def test_topk_breaks_ties_towards_the_lower_index():
    out = compress.TopK(0.5).decode(compress.TopK(0.5).encode(torch.ones(6)))
    assert torch.equal(out, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))


def test_topk_with_ratio_one_round_trips_bitwise():
    x = torch.randn(333)
    assert torch.equal(compress.TopK(1.0).decode(compress.TopK(1.0).encode(x)), x)


def test_int8_round_trips_integers_up_to_127_exactly_and_bounds_the_error():
    ints = torch.arange(-127, 128, dtype=torch.float32)
    assert torch.equal(compress.Int8(255).decode(compress.Int8(255).encode(ints)), ints)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    comp = compress.Int8(128)
    err = (comp.decode(comp.encode(x)) - x).view(-1)
    for b in range(0, 5000, 128):  # at most half a step of its own block's scale
        scale = x[b : b + 128].abs().max() / 127
        assert err[b : b + 128].abs().max() <= scale / 2 * (1 + 1e-5)


def test_sign_decodes_to_plus_minus_the_blocks_mean_magnitude():
    x = torch.tensor([1.0, -3.0, 2.0, 0.0, -1.0, 5.0, -2.0])
    out = compress.Sign(4).decode(compress.Sign(4).encode(x))
    first, last = 6.0 / 4, 8.0 / 3  # mean |x| of [1,-3,2,0] and of the short block [-1,5,-2]
    assert torch.equal(out, torch.tensor([first, -first, first, first, -last, last, -last]))


def test_sign_packs_eight_elements_a_byte_low_bit_first():
    x = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0])
    data = compress.Sign(4096).encode(x)
    assert data[16 + 4 :] == bytes([0b10000001, 0b00000001])


@pytest.mark.parametrize("comp", COMPRESSORS, ids=lambda c: c.name)
def test_truncated_or_extended_bytes_are_refused_with_the_lengths(comp):
    data = comp.encode(torch.randn(100))
    with pytest.raises(compress.CompressError, match="the header says"):
        comp.decode(data[:-1])
    with pytest.raises(compress.CompressError, match="the header says"):
        comp.decode(data + b"\0")
    with pytest.raises(compress.CompressError, match="header"):
        comp.decode(data[:10])


def test_a_codec_mismatch_and_an_unknown_codec_are_refused():
    data = compress.Int8().encode(torch.randn(10))
    with pytest.raises(compress.CompressError, match="codec 2 in the header, expected 1"):
        compress.TopK().decode(data)
    with pytest.raises(compress.CompressError, match="unknown codec 9"):
        compress.decode(bytes([9]) + data[1:])


def test_topk_indices_out_of_range_are_refused():
    data = bytearray(compress.TopK(0.5).encode(torch.arange(4, dtype=torch.float32)))
    data[16:20] = (4).to_bytes(4, "little")
    with pytest.raises(compress.CompressError, match="out of range"):
        compress.TopK().decode(bytes(data))


def test_non_flat_or_non_fp32_input_is_refused():
    with pytest.raises(compress.CompressError, match="1-D float32"):
        compress.Int8().encode(torch.randn(2, 3))
    with pytest.raises(compress.CompressError, match="1-D float32"):
        compress.Sign().encode(torch.randn(4, dtype=torch.float64))


def test_parse_reads_the_settings_and_names_the_field_on_bad_ones():
    assert compress.parse("topk:0.05") == compress.TopK(0.05)
    assert compress.parse("int8") == compress.Int8()
    assert compress.parse("sign:512") == compress.Sign(512)
    for bad in ("topk:0", "topk:2", "int8:0", "sign:x", "lz4"):
        with pytest.raises(ValueError, match="transport.compress"):
            compress.parse(bad)
