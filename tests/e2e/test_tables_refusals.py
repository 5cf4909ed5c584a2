"""What a job with embedding tables cannot have yet, refused up front against real daemons
(README, "Surviving failures"; docs/tables.md, "Not yet wired"): replicas (the job fails at
once, its reason naming `cluster.replicas`) and a reshard (`shardps reshard` refused
FAILED_PRECONDITION, nothing changed, the job trains on). Before these checks the first
failed only at InitShard and the second after three join timeouts (3 x 120 s)."""

from __future__ import annotations

import grpc
import pytest

from shardps.client.api import ClientError
from shardps.proto import common_pb2, coordinator_pb2, ps_pb2, ps_pb2_grpc
from shardps.runtime import rpc
from tests import harness
from tests.e2e.test_recovery import Cluster

MODEL = "tests.integration.tablemodel:table_model"


def spec(name: str, steps: int, replicas: int) -> str:
    return f"""
name: {name}
seed: 3
model: {{name: "{MODEL}"}}
data: {{dataset: digits, batch_size: 32, shuffle: true}}
optimizer: {{lr: 0.01}}
consistency: {{mode: sync}}
cluster: {{servers: 2, workers: 1, replicas: {replicas}}}
stop: {{max_steps: {steps}, eval_every: 1000}}
"""


@pytest.mark.timeout(300)
def test_a_job_with_tables_is_refused_replicas_and_reshards(tmp_path):
    cluster = Cluster(tmp_path, servers=2, workers=1, worker_args=[["--step-delay-ms", "20"]])
    try:
        refused = cluster.client.submit(spec("tables-r2", 50, replicas=2))
        final = cluster.final(refused, timeout=120)
        assert final.state == common_pb2.JOB_STATE_FAILED
        assert "cluster.replicas: a model with embedding tables (emb, bag) cannot have " \
               "replicas yet: 2 > 1" in final.reason, final.reason
        assert not final.shard_map.shards and final.step == 0  # no layout stored, no step
        for server in cluster.servers:  # no server was given a shard of it
            assert not any(i.job_id == refused for i in shards_on(server.address))

        job_id = cluster.client.submit(spec("tables-r1", 100000, replicas=1))
        cluster.wait_step(job_id, 5)
        before = cluster.client.job(job_id)
        assert list(before.layout.tables) == ["emb", "bag"]
        with pytest.raises(ClientError) as refusal:
            cluster.client.reshard(job_id, 1)
        assert refusal.value.code == grpc.StatusCode.FAILED_PRECONDITION
        message = (f"job {job_id} has embedding tables (emb, bag); a job with tables cannot "
                   "be resharded yet")
        assert message in str(refusal.value)
        out = harness.run_cli("reshard", job_id, "--servers", "1", "--coordinator",
                              cluster.coord.address, timeout=60)
        assert out.returncode != 0 and message in out.stderr, out.stderr
        after = cluster.client.job(job_id)
        assert after.shard_map == before.shard_map and list(after.servers) == list(before.servers)
        assert after.reshard.state == coordinator_pb2.RESHARD_STATE_UNSPECIFIED
        cluster.wait_step(job_id, after.step + 5)  # it trains on
        cluster.client.cancel(job_id)
        assert cluster.final(job_id).state == common_pb2.JOB_STATE_CANCELLED
    finally:
        cluster.stop()


def shards_on(address: str) -> list[ps_pb2.ShardInfo]:
    """Every shard a server holds, of any job (GetShardInfo)."""
    with rpc.make_channel(address) as channel:
        return list(ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
            ps_pb2.GetShardInfoRequest(), timeout=rpc.CONTROL_DEADLINE_S).shards)
