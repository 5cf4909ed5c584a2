"""Catch-up by transfer between two real servers on port 0, over real gRPC, without a
coordinator (server/ps/transfer.py, server/ps/joining.py): a joining copy queues forwarded
pushes until the state arrives, installs it and replays them, ending bitwise equal to the
primary; bad transfers are refused naming what is wrong and install nothing."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from shardps.proto import common_pb2, ps_pb2, ps_pb2_grpc
from shardps.psclient.rpcpath import RpcTransport
from shardps.runtime import rpc
from shardps.server.ps import transfer
from shardps.server.ps.daemon import ParameterServerDaemon

LENGTH = 300


@pytest.fixture
def servers() -> Iterator[tuple[ParameterServerDaemon, ParameterServerDaemon]]:
    started = [ParameterServerDaemon(coordinator=None, metrics_port=-1).start() for _ in range(2)]
    yield started[0], started[1]
    for server in started:
        server.stop(0)


def config() -> ps_pb2.ShardConfig:
    return ps_pb2.ShardConfig(
        job_id="job", shard_index=0, offset=0, length=LENGTH, total=LENGTH,
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8),
        mode=common_pb2.CONSISTENCY_ASYNC, workers=["w0"], epoch=1, layout_fingerprint="t")


def push(address: str, step: int, seed: int, replica_epoch: int = 0) -> ps_pb2.PushResponse:
    grad = torch.randn(LENGTH, generator=torch.Generator().manual_seed(seed))
    header = ps_pb2.PushHeader(job_id="job", shard_index=0, worker_id="w0", step=step,
                               dtype=common_pb2.DTYPE_FLOAT32, batch_size=1, length=LENGTH,
                               replica_epoch=replica_epoch)
    transport = RpcTransport(address, 1 << 20)
    try:
        reply, _ = transport.start_push(header, grad).finish()
        return reply
    finally:
        transport.close()


def call(address: str, method: str, request):
    with rpc.make_channel(address) as channel:
        return getattr(ps_pb2_grpc.ParameterServerStub(channel), method)(
            request, timeout=rpc.CONTROL_DEADLINE_S)


def infos(address: str) -> list[ps_pb2.ShardInfo]:
    return list(call(address, "GetShardInfo", ps_pb2.GetShardInfoRequest(job_id="job")).shards)


def join(address: str, join_epoch: int, job_id: str = "job") -> None:
    call(address, "JoinShard", ps_pb2.JoinShardRequest(job_id=job_id, shard_index=0,
                                                       join_epoch=join_epoch))


def test_a_joiner_replays_the_pushes_queued_during_the_transfer_bitwise(servers):
    primary, joiner = servers
    transport = RpcTransport(primary.address, 1 << 20)
    try:
        transport.init(config(), torch.randn(LENGTH, generator=torch.Generator().manual_seed(1)))
    finally:
        transport.close()
    for step in range(3):
        assert push(primary.address, step, seed=10 + step).status == ps_pb2.PUSH_STATUS_APPLIED
    state = primary.shards.get("job", 0).capture()
    join(joiner.address, 5)
    # Two pushes after the capture, applied on the primary and forwarded to the joiner, which
    # has no state yet: it queues them. A retry of one already in the state is harmless.
    for step, seed in ((3, 13), (4, 14)):
        assert push(primary.address, step, seed).status == ps_pb2.PUSH_STATUS_APPLIED
        assert push(joiner.address, step, seed, replica_epoch=1).status == ps_pb2.PUSH_STATUS_ACCEPTED
    assert push(joiner.address, 2, 12, replica_epoch=1).status == ps_pb2.PUSH_STATUS_ACCEPTED
    assert infos(joiner.address) == []
    reply = transfer.send(state, joiner.address, 5)
    assert (reply.version, reply.drained) == (3, 3)
    assert [(i.version, i.pushes_applied) for i in infos(joiner.address)] == [(5, 5)]
    a, b = primary.shards.get("job", 0).capture(), joiner.shards.get("job", 0).capture()
    assert (a.version, a.adam_step, a.applied) == (b.version, b.adam_step, b.applied)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert [(c.job_id, c.shard_index, c.version) for c in joiner.joining.caught_up()] == [
        ("job", 0, 5)]
    # Installed: a forwarded push is applied at once now.
    assert push(joiner.address, 5, 15, replica_epoch=1).status == ps_pb2.PUSH_STATUS_APPLIED
    with pytest.raises(grpc.RpcError) as info:  # the same join again
        transfer.send(state, joiner.address, 5)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def requests(*messages: dict) -> Iterator[ps_pb2.TransferShardRequest]:
    yield ps_pb2.TransferShardRequest(job_id="job", shard_index=0, join_epoch=2)
    for m in messages:
        yield ps_pb2.TransferShardRequest(**m)


@pytest.mark.parametrize("messages, code, message", [
    ([{"file": "../weights.bin", "data": b"x"}], "INVALID_ARGUMENT",
     "file '../weights.bin' is not a checkpoint file"),
    ([{"file": "weights.bin", "offset": 4, "data": b"x"}], "INVALID_ARGUMENT",
     "file weights.bin: chunk at offset 4, expected 0"),
    ([{"file": "manifest.msgpack", "data": b"junk"}], "INVALID_ARGUMENT", "transferred state: "),
    ([], "INVALID_ARGUMENT", "transferred state: "),
])
def test_a_bad_transfer_is_refused_and_installs_nothing(servers, messages, code, message):
    _, joiner = servers
    join(joiner.address, 2)
    with pytest.raises(grpc.RpcError) as info:
        call(joiner.address, "TransferShard", requests(*messages))
    assert info.value.code().name == code and message in info.value.details()
    assert infos(joiner.address) == [] and joiner.joining.caught_up() == []


def test_a_transfer_or_join_that_is_not_expected_is_refused(servers):
    _, joiner = servers
    with pytest.raises(grpc.RpcError) as info:  # no JoinShard before it
        call(joiner.address, "TransferShard", requests())
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not joining here at join epoch 2" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        join(joiner.address, 1, job_id="bad/id")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id" in info.value.details()
    join(joiner.address, 3)
    with pytest.raises(grpc.RpcError) as info:  # an older join than the one here
        join(joiner.address, 2)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "joining at join epoch 3 here, not 2" in info.value.details()
