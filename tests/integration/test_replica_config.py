"""InitShard's replica map (a replicated job's placement, ShardConfig.replica_map) is checked
like the rest of the config: a bad one is INVALID_ARGUMENT naming the field, and no shard is
created. A real server on port 0, over real gRPC."""

from __future__ import annotations

import grpc
import pytest
import torch

from shardps.proto import common_pb2, ps_pb2, ps_pb2_grpc
from shardps.psclient.rpcpath import RpcTransport
from shardps.runtime import rpc
from shardps.server.ps.daemon import ParameterServerDaemon


@pytest.fixture
def server():
    started = ParameterServerDaemon(coordinator=None, metrics_port=-1).start()
    yield started
    started.stop(0)


def config(replica_map: common_pb2.ShardMap) -> ps_pb2.ShardConfig:
    cfg = ps_pb2.ShardConfig(
        job_id="job", shard_index=0, offset=0, length=4, total=4,
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8),
        mode=common_pb2.CONSISTENCY_ASYNC, workers=["w0"], epoch=1, layout_fingerprint="t")
    cfg.replica_map.CopyFrom(replica_map)
    return cfg


def one_shard(**fields) -> common_pb2.ShardMap:
    shard_map = common_pb2.ShardMap(version=1)
    shard_map.shards.add(**{**dict(index=0, server_id="server-a", address="h:1", offset=0,
                                   length=4, backup_ids=["server-b"], backup_addresses=["h:2"],
                                   replica_epoch=1), **fields})
    return shard_map


@pytest.mark.parametrize("bad, message", [
    (one_shard(backup_addresses=[]), "shard 0 has 1 backup_ids and 0 backup_addresses"),
    (one_shard(backup_ids=["server-a"]), "shard 0 names a server twice"),
    (one_shard(replica_epoch=0), "must name shard 0 once, with replica_epoch > 0"),
    (one_shard(index=1), "must name shard 0 once"),
])
def test_a_bad_replica_map_is_refused_naming_the_field(server, bad, message):
    transport = RpcTransport(server.address, 1 << 20)
    try:
        with pytest.raises(grpc.RpcError) as info:
            transport.init(config(bad), torch.zeros(4))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "config.replica_map: " in info.value.details()
        assert message in info.value.details()
        transport.init(config(one_shard()), torch.zeros(4))  # a good one is taken
    finally:
        transport.close()
    with rpc.make_channel(server.address) as channel:
        shards = ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
            ps_pb2.GetShardInfoRequest(job_id="job"), timeout=rpc.CONTROL_DEADLINE_S).shards
    # Only the good config made a shard; without a coordinator nobody is its primary yet.
    assert [(s.replica_epoch, s.replica_role) for s in shards] == [(1, "none")]
