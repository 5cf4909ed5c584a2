"""A replicated shard's primary forwards a push to its backup cut-through (each piece as it
arrives) where it can, and whole otherwise; either way the backup ends bit for bit where the
primary is, and a push refused while it arrived leaves the backup untouched. A coordinator
and two parameter servers in this process, on port 0, over real gRPC and the data plane."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.psclient import PSClient
from shardps.server.ps.daemon import ParameterServerDaemon
from shardps.server.ps.forwarding import PIECE_BYTES
from shardps.worker.recovery import backup_layers
from tests.harness import poll

WORKER = "w0"
LENGTH = 5 * PIECE_BYTES // 4 + 1000  # 6 pieces of an in-order push, the last one short


@pytest.fixture
def job(coordinators):
    """An async job of one shard: server A its primary, server B its backup."""
    coordinator, client = coordinators()
    servers = [ParameterServerDaemon(coordinator=coordinator.address, metrics_port=-1).start()
               for _ in range(2)]
    try:
        poll(lambda: len(client.nodes()) == 2, 30, what="both servers registered")
        ids = {n.address: n.node_id for n in client.nodes()}
        shard_map = common_pb2.ShardMap(version=1)
        shard_map.shards.add(index=0, server_id=ids[servers[0].address],
                             address=servers[0].address, offset=0, length=LENGTH,
                             backup_ids=[ids[servers[1].address]],
                             backup_addresses=[servers[1].address], replica_epoch=1)
        config = ps_pb2.ShardConfig(
            optimizer=common_pb2.OptimizerConfig(name="adam", lr=1e-3, beta1=0.9, beta2=0.999,
                                                 eps=1e-8),
            mode=common_pb2.CONSISTENCY_ASYNC, workers=[WORKER], epoch=1,
            layout_fingerprint="cut-through", replica_map=shard_map)
        weights = torch.randn(LENGTH, generator=torch.Generator().manual_seed(1))
        for layer in [shard_map, *backup_layers(shard_map)]:
            with PSClient("job", layer, worker_id=WORKER) as init:
                init.init(weights, config)
        with PSClient("job", shard_map, worker_id=WORKER) as worker:
            yield worker, servers
    finally:
        for server in servers:
            server.stop(0)


def gradient(step: int) -> torch.Tensor:
    return torch.randn(LENGTH, generator=torch.Generator().manual_seed(100 + step)) * 1e-2


def forwards(server: ParameterServerDaemon, way: str) -> float:
    value = server.metrics_registry.get_sample_value("shardps_ps_forwarded_pushes_total",
                                                     {"way": way})
    return value or 0.0


def assert_same_state(servers: list[ParameterServerDaemon], version: int) -> None:
    primary, backup = (s.shards.get("job", 0).capture() for s in servers)
    assert primary.version == backup.version == version
    assert primary.pushes_applied == backup.pushes_applied == version
    assert primary.tensors.keys() == backup.tensors.keys() and "exp_avg" in primary.tensors
    for name, tensor in primary.tensors.items():
        assert torch.equal(tensor, backup.tensors[name]), name


def test_in_order_and_overlapped_pushes_go_on_cut_through_and_the_copies_stay_equal(job):
    worker, servers = job
    for step in range(3):
        reply = worker.push(gradient(step), step=step, base_version=step, batch_size=1)
        assert reply[0].status == ps_pb2.PUSH_STATUS_APPLIED
    # An overlapped push whose pieces arrive last first: each goes on once it is in.
    third = LENGTH // 3
    buckets = [(0, third), (third, 2 * third), (2 * third, LENGTH)]
    push = worker.begin_push(gradient(3), step=3, base_version=3, batch_size=1, buckets=buckets)
    for bucket in reversed(range(len(buckets))):
        push.ready(bucket)
    assert push.finish()[0].status == ps_pb2.PUSH_STATUS_APPLIED
    assert forwards(servers[0], "cut_through") == 4 and forwards(servers[0], "whole") == 0
    assert_same_state(servers, 4)


def test_a_push_refused_as_it_arrives_reaches_no_backup(job):
    worker, servers = job
    worker.push(gradient(0), step=0, base_version=0, batch_size=1)
    bad = gradient(1)
    bad[-1] = float("nan")  # in the last piece: the others went on to the backup already
    with pytest.raises(grpc.RpcError) as info:
        worker.push(bad, step=1, base_version=1, batch_size=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_same_state(servers, 1)
    reply = worker.push(gradient(1), step=1, base_version=1, batch_size=1)
    assert reply[0].status == ps_pb2.PUSH_STATUS_APPLIED  # and the backup takes the next one
    assert forwards(servers[0], "cut_through") == 2
    assert_same_state(servers, 2)


def test_a_push_that_waits_for_its_shards_turn_is_forwarded_whole(job):
    worker, servers = job
    replies = []
    with servers[0].replicas.shard_turn("job", 0, timeout=10) as held:
        assert held  # another push of the shard is between its forward and its apply
        pushing = threading.Thread(target=lambda: replies.append(
            worker.push(gradient(0), step=0, base_version=0, batch_size=1)))
        pushing.start()
        poll(lambda: servers[0].metrics_registry.get_sample_value(
            "shardps_ps_push_bytes_total", {"job": "job"}), 30, what="the push received")
    pushing.join(30)
    assert replies and replies[0][0].status == ps_pb2.PUSH_STATUS_APPLIED
    assert forwards(servers[0], "whole") == 1 and forwards(servers[0], "cut_through") == 0
    assert_same_state(servers, 1)
