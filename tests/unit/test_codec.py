"""The tensor codec: round trips for every wire dtype, chunking and bad input."""

import pytest
import torch

from shardps.proto import codec, common_pb2, ps_pb2

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

HEADER = ps_pb2.PushHeader(job_id="job", shard_index=1, worker_id="w", step=7, length=3000,
                           dtype=common_pb2.DTYPE_BFLOAT16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_messages_are_the_bytes_protobuf_would_write(dtype):
    flat = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    first = ps_pb2.PushRequest(header=HEADER).SerializeToString()
    messages = list(codec.chunk_messages(flat, dtype, 2, 4096, first))
    chunks = list(codec.iter_chunks(flat, dtype, 4096))
    assert len(messages) == len(chunks) > 1
    for i, (data, chunk) in enumerate(zip(messages, chunks, strict=True)):
        expected = ps_pb2.PushRequest(chunk=chunk)
        if i == 0:
            expected.header.CopyFrom(HEADER)
        assert data == expected.SerializeToString()


def test_a_header_alone_is_sent_for_an_empty_tensor():
    first = ps_pb2.PushRequest(header=HEADER).SerializeToString()
    assert list(codec.chunk_messages(torch.empty(0), common_pb2.DTYPE_FLOAT32, 2, first=first)) == [first]


@pytest.mark.parametrize("message", [
    ps_pb2.PushRequest(header=HEADER, chunk=common_pb2.TensorChunk(offset=5, data=b"abcdefgh")),
    ps_pb2.PushRequest(chunk=common_pb2.TensorChunk(offset=0, data=b"\x00\x00\x80\x3f")),
    ps_pb2.PushRequest(chunk=common_pb2.TensorChunk(offset=-3, data=b"")),
    ps_pb2.PushRequest(chunk=common_pb2.TensorChunk(offset=2**40)),
    ps_pb2.PushRequest(header=HEADER),
    ps_pb2.PushRequest(),
], ids=["header+chunk", "chunk", "negative-offset", "no-data", "header", "empty"])
def test_the_reader_reads_what_protobuf_writes(message):
    read = codec.message_reader(ps_pb2.PushRequest)(message.SerializeToString())
    assert read.message.header == message.header
    assert read.message.HasField("header") == message.HasField("header")
    if message.HasField("chunk"):
        assert (read.chunk.offset, bytes(read.chunk.data)) == (message.chunk.offset, message.chunk.data)
    else:
        assert read.chunk is None


def test_unusual_encodings_read_as_protobuf_reads_them():
    # Two chunk fields merge (the later offset wins), unknown fields are kept, not misread.
    data = (ps_pb2.PushRequest(chunk=common_pb2.TensorChunk(offset=1, data=b"ab")).SerializeToString()
            + ps_pb2.PushRequest(chunk=common_pb2.TensorChunk(offset=4)).SerializeToString()
            + b"\x98\x06\x01")  # field 99, varint 1: unknown to PushRequest
    parsed = ps_pb2.PushRequest.FromString(data)
    read = codec.message_reader(ps_pb2.PushRequest)(data)
    assert (read.chunk.offset, bytes(read.chunk.data)) == (parsed.chunk.offset, parsed.chunk.data) == (4, b"ab")


def test_bytes_protobuf_rejects_raise():
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError; gRPC answers INTERNAL
        codec.message_reader(ps_pb2.PushRequest)(b"\x12\xff\xff\xff\x0f")


def test_pull_response_header_and_first_chunk_in_one_message():
    head = ps_pb2.PullResponse(ready=True, version=9, length=3, job_done=True).SerializeToString()
    (data,) = codec.chunk_messages(torch.tensor([1.0, 2.0, 3.0]), common_pb2.DTYPE_FLOAT32, 5, first=head)
    read = codec.message_reader(ps_pb2.PullResponse)(data)
    assert (read.message.ready, read.message.version, read.message.length, read.message.job_done) == (True, 9, 3, True)
    assert torch.equal(codec.decode(read.chunk.data, common_pb2.DTYPE_FLOAT32), torch.tensor([1.0, 2.0, 3.0]))


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
