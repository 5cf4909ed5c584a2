"""Compressed pushes (PushHeader fields 30-39) against real servers, over the data plane and
the Push RPC: the server applies exactly what the worker's codec decodes, and a compressed
body that is not a valid encoding is refused with INVALID_ARGUMENT and changes nothing."""

from __future__ import annotations

import struct

import grpc
import pytest
import torch

from shardps.proto import compress, dataplane, ps_pb2, ps_pb2_grpc
from shardps.psclient import PSClient
from shardps.runtime import rpc
from tests.integration.test_dataplane import started
from tests.integration.test_ps import ASYNC, reference_adam, shard_config, shard_map

TOTAL = 20_000
APPLIED = ps_pb2.PUSH_STATUS_APPLIED


@pytest.fixture
def two_servers():
    """One server with a data plane and one without (reached over the Push RPC)."""
    on, off = started(), started(data_port=-1)
    yield on, off
    on.stop(0)
    off.stop(0)


def _encode(smap, grad: torch.Tensor, compressor) -> list[bytes]:
    return [compressor.encode(grad[s.offset : s.offset + s.length]) for s in smap.shards]


@pytest.fixture(params=["whole", "pieces"])
def landing(request, monkeypatch):
    """The data plane's body read in one piece (20,000 elements are less than LANDING_BYTES),
    or in 1000-byte pieces: a refusal found in the first is raised only after the last, so the
    connection stays in step (the servers here run in this process)."""
    if request.param == "pieces":
        monkeypatch.setattr(dataplane, "LANDING_BYTES", 1000)


@pytest.mark.parametrize("setting", ["int8", "topk:0.05", "sign:512"])
def test_the_server_applies_exactly_the_workers_decode(two_servers, setting, landing):
    smap = shard_map(two_servers, TOTAL)
    compressor = compress.parse(setting)
    init, grad = torch.randn(TOTAL), torch.randn(TOTAL)
    encoded = _encode(smap, grad, compressor)
    with PSClient("job", smap, worker_id="w0") as client:
        client.init(init, shard_config(ASYNC))
        replies = client.push(grad, step=0, base_version=0, batch_size=1, encoded=encoded)
        assert [r.status for r in replies] == [APPLIED, APPLIED]
        dest = torch.empty(TOTAL)
        assert client.pull(dest, min_version=1).ready
    decoded = torch.cat([compressor.decode(e) for e in encoded])
    assert not torch.equal(decoded, grad)  # lossy, so the check below means something
    assert torch.equal(dest, reference_adam(init, [decoded]))
    for server, data in zip(two_servers, encoded, strict=True):
        assert server.shards.shards("job")[0].pushes_applied == 1
        pushed = server.metrics.push_bytes.labels("job")._value.get()
        assert pushed == len(data)  # the server counts the bytes that came, not fp32's


@pytest.mark.parametrize("setting", ["int8", "sign:32"])
def test_a_push_decoded_chunk_by_chunk_as_it_lands_is_the_workers_decode(two_servers, setting,
                                                                          monkeypatch):
    """A shard of several codec chunks, its body landing in 4 KiB pieces: the server decodes
    each chunk as soon as its bytes are in, and applies exactly the whole decode."""
    monkeypatch.setattr(dataplane, "LANDING_BYTES", 4096)
    total = 3 * compress.CHUNK + 77
    smap = shard_map(two_servers[:1], total)
    compressor = compress.parse(setting)
    init, grad = torch.randn(total), torch.randn(total)
    encoded = _encode(smap, grad, compressor)
    with PSClient("job", smap, worker_id="w0") as client:
        client.init(init, shard_config(ASYNC))
        assert client.push(grad, step=0, base_version=0, batch_size=1, encoded=encoded)[0].status == APPLIED
        dest = torch.empty(total)
        assert client.pull(dest, min_version=1).ready
    assert torch.equal(dest, reference_adam(init, [compressor.decode(encoded[0])]))


def _nan_scale(data: bytes) -> bytes:
    """An int8 encoding whose first block scale is NaN."""
    return data[:16] + struct.pack("<f", float("nan")) + data[20:]


def _index_out_of_range(data: bytes, numel: int) -> bytes:
    """A top-k encoding whose last index is numel (one past the end)."""
    k = struct.unpack_from("<BBHIQ", data)[3]
    at = 16 + 4 * (k - 1)
    return data[:at] + struct.pack("<i", numel) + data[at + 4:]


BAD = {
    "truncated": (lambda n: compress.Int8().encode(torch.randn(n))[:-1], "compressed push"),
    "nan scale": (lambda n: _nan_scale(compress.Int8().encode(torch.randn(n))), "non-finite"),
    "index out of range": (lambda n: _index_out_of_range(
        compress.TopK(0.1).encode(torch.randn(n)), n), "out of range"),
    "wrong numel": (lambda n: compress.Int8().encode(torch.randn(n - 1)), "elements"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_compressed_bodies_are_refused_and_change_nothing(two_servers, case, landing):
    make, words = BAD[case]
    for server in two_servers:  # the data plane, then the Push RPC
        smap = shard_map([server], TOTAL)
        init, grad = torch.randn(TOTAL), torch.randn(TOTAL)
        with PSClient("job", smap, worker_id="w0") as client:
            client.init(init, shard_config(ASYNC))
            with pytest.raises(grpc.RpcError) as err:
                client.push(grad, step=0, base_version=0, batch_size=1, encoded=[make(TOTAL)])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in err.value.details()
            shard = server.shards.shards("job")[0]
            assert (shard.version, shard.pushes_applied) == (0, 0)
            # The same client's next push applies (its connection is still in step).
            good = [compress.Int8().encode(grad)]
            assert client.push(grad, step=0, base_version=0, batch_size=1,
                               encoded=good)[0].status == APPLIED
            dest = torch.empty(TOTAL)
            assert client.pull(dest, min_version=1).ready
        assert torch.equal(dest, reference_adam(init, [compress.Int8().decode(good[0])]))


@pytest.mark.parametrize("fields, words", [
    (dict(compression=9, compressed_bytes=100), "unknown compression 9"),
    (dict(compression=ps_pb2.PUSH_COMPRESSION_INT8, compressed_bytes=10**12), "compressed_bytes"),
    (dict(compression=ps_pb2.PUSH_COMPRESSION_INT8, compressed_bytes=3), "compressed_bytes"),
])
def test_compressed_headers_out_of_bounds_are_refused_before_the_body(two_servers, fields, words):
    server = two_servers[1]
    smap = shard_map([server], TOTAL)
    with PSClient("job", smap, worker_id="w0") as client:
        client.init(torch.randn(TOTAL), shard_config(ASYNC))
    header = ps_pb2.PushHeader(job_id="job", shard_index=0, worker_id="w0", step=0,
                               base_version=0, batch_size=1, length=TOTAL, **fields)
    with rpc.make_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            ps_pb2_grpc.ParameterServerStub(channel).Push(
                iter([ps_pb2.PushRequest(header=header)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()
    assert server.shards.shards("job")[0].version == 0
