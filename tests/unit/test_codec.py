"""The tensor codec: round trips for every wire dtype, chunking and bad input."""

import pytest
import torch

from shardps.proto import codec, common_pb2

DTYPES = [common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_FLOAT16]


def roundtrip(flat, dtype, chunk_bytes):
    out = torch.full_like(flat, float("nan"))
    assembler = codec.ChunkAssembler(out, dtype)
    chunks = list(codec.iter_chunks(flat, dtype, chunk_bytes))
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish(), chunks


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_is_the_cast_and_spans_many_chunks(dtype):
    flat = torch.randn(300_001, generator=torch.Generator().manual_seed(1))
    out, chunks = roundtrip(flat, dtype, 64 * 1024)
    expected = flat.to(codec.torch_dtype(dtype)).to(torch.float32)
    assert torch.equal(out, expected)
    assert len(chunks) > 1
    assert all(len(c.data) <= 64 * 1024 for c in chunks)
    assert chunks[1].offset == len(chunks[0].data) // codec.element_size(dtype)


def test_float32_roundtrip_is_bitwise_including_special_values():
    flat = torch.tensor([0.0, -0.0, 1e-45, 3.4e38, float("inf"), -float("inf"), 1 / 3])
    out, _ = roundtrip(flat, common_pb2.DTYPE_FLOAT32, codec.DEFAULT_CHUNK_BYTES)
    assert torch.equal(out.view(torch.int32), flat.view(torch.int32))


def test_bytes_are_little_endian_raw_values():
    data = codec.encode(torch.tensor([1.0, 2.0]), common_pb2.DTYPE_FLOAT32)
    assert data == b"\x00\x00\x80\x3f\x00\x00\x00\x40"


def test_chunk_size_is_clamped_to_allowed_range():
    assert codec.chunk_elements(common_pb2.DTYPE_FLOAT32, 1) == codec.MIN_CHUNK_BYTES // 4
    assert codec.chunk_elements(common_pb2.DTYPE_FLOAT32, 1 << 40) == codec.MAX_CHUNK_BYTES // 4


def test_empty_tensor_has_no_chunks_and_completes():
    out, chunks = roundtrip(torch.empty(0), common_pb2.DTYPE_FLOAT32, 4096)
    assert chunks == [] and out.numel() == 0


def test_out_of_order_chunk_is_refused():
    flat = torch.arange(4096, dtype=torch.float32)
    chunks = list(codec.iter_chunks(flat, common_pb2.DTYPE_FLOAT32, 4096))
    assembler = codec.ChunkAssembler(torch.zeros(4096), common_pb2.DTYPE_FLOAT32)
    with pytest.raises(codec.CodecError, match="expected 0"):
        assembler.add(chunks[1])


def test_chunk_past_the_end_leaves_destination_untouched():
    dest = torch.zeros(8)
    chunk = common_pb2.TensorChunk(offset=6, data=codec.encode(torch.ones(4), common_pb2.DTYPE_FLOAT32))
    with pytest.raises(codec.CodecError, match="outside"):
        codec.write_chunk(dest, chunk, common_pb2.DTYPE_FLOAT32)
    assert torch.equal(dest, torch.zeros(8))


def test_truncated_element_and_missing_chunks_are_errors():
    with pytest.raises(codec.CodecError, match="whole number"):
        codec.decode(b"\x00\x00\x80", common_pb2.DTYPE_FLOAT32)
    assembler = codec.ChunkAssembler(torch.zeros(10), common_pb2.DTYPE_FLOAT32)
    assembler.add(common_pb2.TensorChunk(offset=0, data=codec.encode(torch.ones(4), common_pb2.DTYPE_FLOAT32)))
    with pytest.raises(codec.CodecError, match="received 4 of 10"):
        assembler.finish()


def test_unknown_dtype_is_an_error():
    with pytest.raises(codec.CodecError, match="unknown wire dtype"):
        codec.ChunkAssembler(torch.zeros(1), 99)


# -- bulk messages, byte by byte: exactly protobuf's encoding, both ways ---------------------

def test_assembler_checks_each_chunk_for_non_finite_values_as_it_lands():
    out = torch.empty(8)
    good = codec.ChunkAssembler(out, common_pb2.DTYPE_FLOAT32, check_finite=True)
    for chunk in codec.iter_chunks(torch.arange(8.0), common_pb2.DTYPE_FLOAT32, 16):
        good.add(chunk)
    assert good.finish() is out and good.all_finite
    bad = codec.ChunkAssembler(torch.empty(8), common_pb2.DTYPE_FLOAT32, check_finite=True)
    for chunk in codec.iter_chunks(torch.tensor([0.0] * 6 + [float("nan"), 1.0]), common_pb2.DTYPE_FLOAT32, 16):
        bad.add(chunk)
    assert not bad.all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pushable_means_finite_and_within_max_gradient(dtype):
    big = codec.MAX_GRADIENT

    def ok(values):
        return codec.pushable(torch.tensor(values, dtype=torch.float32).to(dtype))

    assert ok([]) and ok([0.0, -1.5, 3.0])
    assert not ok([1.0, float("nan")]) and not ok([float("inf")]) and not ok([float("-inf"), 0.0])
    if dtype != torch.float16:  # fp16 holds nothing beyond 65504
        assert ok([big, -big, 1.0])
        assert not ok([1.0, 3e38]) and not ok([-big * 1.01]) and not ok([1e19] * 4)
        # Many large values overflow the fp32 sum of squares: the exact look decides.
        assert ok([big / 2] * 10_000)
    assert ok([65504.0] * 1000)


def test_assembler_refuses_values_that_would_overflow_adam_as_they_land():
    bad = codec.ChunkAssembler(torch.empty(8), common_pb2.DTYPE_FLOAT32, check_finite=True)
    for chunk in codec.iter_chunks(torch.tensor([0.0] * 6 + [3e38, 1.0]), common_pb2.DTYPE_FLOAT32, 16):
        bad.add(chunk)
    assert bad.complete and not bad.all_finite
