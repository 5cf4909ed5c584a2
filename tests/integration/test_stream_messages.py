"""What each message of the Push and Pull streams carries, as ps.proto documents it, seen on
a raw gRPC stream of a real server."""

from __future__ import annotations

import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.psclient import PSClient
from shardps.server.ps.daemon import ParameterServerDaemon
from tests.integration.test_ps import APPLIED, f32, push_raw, shard_config, shard_map, stub

TOTAL = 4000
CHUNK_ELEMENTS = 1024  # chunk_bytes 4096 in fp32 (the smallest a server honours)


@pytest.fixture
def servers():
    """One standalone server (no coordinator), in a list as shard_map takes it."""
    server = ParameterServerDaemon(coordinator=None).start()
    yield [server]
    server.stop(0)


def _pull(server, **fields) -> list[ps_pb2.PullResponse]:
    request = ps_pb2.PullRequest(job_id="job", shard_index=0, dtype=common_pb2.DTYPE_FLOAT32,
                                 chunk_bytes=CHUNK_ELEMENTS * 4, **fields)
    return list(stub(server).Pull(request, timeout=30))


def test_pull_first_message_carries_the_header_fields_and_the_first_chunk(servers):
    init = torch.arange(TOTAL, dtype=torch.float32)
    with PSClient("job", shard_map(servers, TOTAL), worker_id="w0", data_plane=False) as client:
        client.init(init, shard_config())
    replies = _pull(servers[0])
    first, rest = replies[0], replies[1:]
    assert (first.ready, first.version, first.length) == (True, 0, TOTAL)
    assert first.HasField("chunk") and first.chunk.offset == 0
    assert [r.chunk.offset for r in replies] == list(range(0, TOTAL, CHUNK_ELEMENTS))
    for r in rest:  # later messages: one chunk each, no header fields
        assert (r.ready, r.version, r.length, r.job_done) == (False, 0, 0, False)
    got = torch.cat([torch.frombuffer(bytearray(r.chunk.data), dtype=torch.float32) for r in replies])
    assert torch.equal(got, init)


def test_a_pull_that_is_not_ready_is_one_message_without_chunks(servers):
    with PSClient("job", shard_map(servers, TOTAL), worker_id="w0", data_plane=False) as client:
        client.init(torch.zeros(TOTAL), shard_config())
    replies = _pull(servers[0], min_version=5, timeout_ms=50)
    assert len(replies) == 1 and not replies[0].ready and not replies[0].HasField("chunk")


def test_push_header_alone_or_with_the_first_chunk_are_both_accepted(servers):
    with PSClient("job", shard_map(servers, TOTAL), worker_id="w0", data_plane=False) as client:
        client.init(torch.zeros(TOTAL), shard_config())
    header = ps_pb2.PushHeader(job_id="job", shard_index=0, worker_id="w0", step=0, base_version=0,
                               dtype=common_pb2.DTYPE_FLOAT32, batch_size=1, length=TOTAL)
    alone = push_raw(stub(servers[0]), header, [(0, f32(2400)), (2400, f32(1600))])
    assert (alone.status, alone.version) == (APPLIED, 1)
    header.step, header.base_version = 1, 1
    together = [ps_pb2.PushRequest(header=header, chunk=common_pb2.TensorChunk(offset=0, data=f32(2400))),
                ps_pb2.PushRequest(chunk=common_pb2.TensorChunk(offset=2400, data=f32(1600)))]
    reply = stub(servers[0]).Push(iter(together), timeout=30)
    assert (reply.status, reply.version) == (APPLIED, 2)
