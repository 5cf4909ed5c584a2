"""GetPreconditioner against real servers: refused (FAILED_PRECONDITION) until the shard is
frozen and to jobs that do not precondition, NOT_FOUND for an unknown shard, and once frozen
every shard's D, which a push of g / D turns into the frozen step on g; D streams in chunks
of the size asked for, in offset order."""

from __future__ import annotations

import grpc
import pytest
import torch

from shardps.proto import ps_pb2, ps_pb2_grpc
from shardps.psclient import PSClient
from shardps.runtime import rpc
from shardps.server.ps.updater import Updater
from tests.integration.test_compressed_push import two_servers  # noqa: F401 (fixture)
from tests.integration.test_ps import ASYNC, shard_config, shard_map

TOTAL = 6_000
W = 2


def test_the_denominator_is_served_once_frozen_and_refused_before(two_servers):  # noqa: F811
    smap = shard_map(two_servers, TOTAL)
    init = torch.randn(TOTAL)
    config = shard_config(ASYNC, freeze_variance_after=W, precondition_pushes=True)
    grads = [torch.randn(TOTAL) for _ in range(W + 1)]
    with PSClient("job", smap, worker_id="w0") as client:
        client.init(init, config)
        with pytest.raises(grpc.RpcError) as info:
            client.preconditioners()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not frozen yet" in (info.value.details() or "")
        for step, g in enumerate(grads[:W]):
            client.push(g, step=step, base_version=step, batch_size=1)
        denominators = client.preconditioners()
        # Each shard's own (floored at its own mean): an Updater given that shard's part of
        # the same pushes hands out the same D, bitwise.
        for s, d in zip(smap.shards, denominators, strict=True):
            part = slice(s.offset, s.offset + s.length)
            ref = Updater(config.optimizer, init[part].clone())
            for g in grads[:W]:
                ref.step([(g[part].clone(), None)], config.optimizer.lr)
            assert torch.equal(d, ref.preconditioner())
        assert bool((torch.cat(denominators) > 0).all())
    for server in two_servers:
        shard = server.shards.shards("job")[0]
        assert _refusal(server, "job", shard.index + 7) == grpc.StatusCode.NOT_FOUND


def test_a_job_that_does_not_precondition_is_refused(two_servers):  # noqa: F811
    smap = shard_map(two_servers, TOTAL)
    with PSClient("plain", smap, worker_id="w0") as client:
        client.init(torch.randn(TOTAL), shard_config(ASYNC, freeze_variance_after=W))
        with pytest.raises(grpc.RpcError) as info:
            client.preconditioners()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "precondition_pushes" in (info.value.details() or "")


def _refusal(server, job_id: str, index: int) -> grpc.StatusCode:
    with rpc.make_channel(server.address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        try:
            list(stub.GetPreconditioner(  # a stream: the status comes as it is read
                ps_pb2.GetPreconditionerRequest(job_id=job_id, shard_index=index),
                timeout=rpc.CONTROL_DEADLINE_S))
        except grpc.RpcError as exc:
            return exc.code()
    raise AssertionError("an unknown shard was answered")


def test_the_denominator_streams_in_chunks_in_offset_order(two_servers):  # noqa: F811
    smap = shard_map(two_servers, TOTAL)
    config = shard_config(ASYNC, freeze_variance_after=W, precondition_pushes=True)
    with PSClient("chunked", smap, worker_id="w0") as client:
        client.init(torch.randn(TOTAL), config)
        for step in range(W):
            client.push(torch.randn(TOTAL), step=step, base_version=step, batch_size=1)
        whole = client.preconditioners()
    with PSClient("chunked", smap, worker_id="w1", chunk_bytes=4096) as small:
        assert all(torch.equal(a, b) for a, b in zip(small.preconditioners(), whole, strict=True))
    shard = smap.shards[0]  # 3,000 elements: 1,024 per 4 KiB chunk
    with rpc.make_channel(shard.address) as channel:
        replies = list(ps_pb2_grpc.ParameterServerStub(channel).GetPreconditioner(
            ps_pb2.GetPreconditionerRequest(job_id="chunked", shard_index=shard.index,
                                            chunk_bytes=4096), timeout=rpc.TRANSFER_DEADLINE_S))
    assert [(r.offset_elements, len(r.denominator) // 4) for r in replies] == [
        (0, 1024), (1024, 1024), (2048, shard.length - 2048)]
    assert {r.length_elements for r in replies} == {shard.length}
    assert torch.equal(torch.frombuffer(bytearray(b"".join(r.denominator for r in replies)),
                                        dtype=torch.float32), whole[0])
