"""Live resharding end to end, every daemon a real process (docs/architecture.md,
"Resharding"): a sync job with 4 shards starts on 2 of 4 servers, `shardps reshard` spreads
it over 4 and back over 2 while it trains; it keeps stepping during each move (its rate
measured from outside, on a server), and ends bit for bit where the same job ends without
resharding.
"""

from __future__ import annotations

import time

import pytest

from shardps.proto import common_pb2, coordinator_pb2, ps_pb2, ps_pb2_grpc
from shardps.runtime import rpc
from tests import harness
from tests.e2e.test_recovery import Cluster, assert_same_state, checkpointed_state
from tests.e2e.test_replicas import assert_nothing_acknowledged_lost

STEPS = 300
STEP_DELAY_MS = "30"  # bounds the rate (< 33 steps/s), so the job outlasts both moves
DONE = coordinator_pb2.RESHARD_STATE_DONE


def spec(name: str, steps: int = STEPS, mode: str = "sync") -> str:
    return f"""
name: {name}
seed: 5
model: {{name: mlp, kwargs: {{hidden: [32]}}}}
data: {{dataset: digits, batch_size: 64, shuffle: true}}
optimizer: {{lr: 0.002}}
consistency: {{mode: {mode}}}
cluster: {{servers: 2, workers: 2, shards: 4}}
stop: {{max_steps: {steps}, eval_every: 1000}}
checkpoint: {{every_steps: 0}}
"""


class Steps:
    """The job's step as its servers count it, from outside: shard 0's version (sync: rounds
    applied) on its primary, which no reshard here moves (it stays on the first server)."""

    def __init__(self, cluster: Cluster, job_id: str):
        self.job_id = job_id
        self.address = cluster.client.job(job_id).shard_map.shards[0].address
        self._channel = rpc.make_channel(self.address)
        self._stub = ps_pb2_grpc.ParameterServerStub(self._channel)

    def now(self) -> tuple[float, int]:
        reply = self._stub.GetShardInfo(ps_pb2.GetShardInfoRequest(job_id=self.job_id),
                                        timeout=rpc.CONTROL_DEADLINE_S)
        return time.monotonic(), next(s.version for s in reply.shards if s.shard_index == 0)

    def rate(self, seconds: float) -> float:
        """Steps per second over the next `seconds`."""
        t0, v0 = self.now()
        time.sleep(seconds)
        t1, v1 = self.now()
        return (v1 - v0) / (t1 - t0)

    def close(self) -> None:
        self._channel.close()


def reshard(cluster: Cluster, job_id: str, servers: int, steps: Steps) -> tuple[float, float]:
    """Reshards the job to N servers (the Reshard RPC, as `shardps reshard` sends it), then
    polls until the reshard is done; returns the steps per second from the call to the end
    of the moves, and how long they took."""
    t0, v0 = steps.now()
    planned = cluster.client.reshard(job_id, servers)
    assert planned.state == coordinator_pb2.RESHARD_STATE_RUNNING
    assert len(planned.servers_after) == servers and planned.moves_total == 2
    info = harness.poll(lambda: (j := cluster.client.job(job_id)).reshard.state == DONE and j,
                        60, interval=0.05, what=f"the reshard to {servers} servers done")
    t1, v1 = steps.now()
    assert info.state == common_pb2.JOB_STATE_RUNNING and v1 < STEPS, "the job outran the move"
    progress = info.reshard
    assert progress.moves_done == progress.moves_total == 2  # 4 shards: 2 move each way
    assert len(progress.servers_after) == servers == len(info.servers)
    primaries = [s.server_id for s in info.shard_map.shards]
    assert sorted(set(primaries)) == sorted(info.servers)  # spread evenly: 4 / N each
    assert all(primaries.count(s) == 4 // servers for s in info.servers)
    # Every server holds what the map gives it, no more: a source frees the copy it gave up.
    given = {s.address: [] for s in cluster.servers}
    for shard in info.shard_map.shards:
        given[shard.address].append(shard.index)
    harness.poll(lambda: all(held(address, job_id) == want for address, want in given.items()),
                 30, interval=0.05, what="each server holding exactly its shards")
    return (v1 - v0) / (t1 - t0), t1 - t0


def held(address: str, job_id: str) -> list[int]:
    """The shards of the job a server holds (GetShardInfo)."""
    return sorted(s.shard_index for s in info(address, job_id))


@pytest.mark.timeout(240)
def test_a_sync_job_resharded_from_2_to_4_servers_and_back_is_bitwise_a_run_that_was_not(
        tmp_path):
    """The same job twice at once, each on 2 of the 4 servers with 2 workers of its own: one
    left alone, one resharded to 4 servers (onto the other job's two) and back to 2."""
    cluster = Cluster(tmp_path, servers=4, workers=4,
                      worker_args=[["--step-delay-ms", STEP_DELAY_MS]] * 4)
    try:
        straight = cluster.client.submit(spec("straight"))
        job_id = cluster.client.submit(spec("moved"))
        first = list(cluster.client.job(job_id).servers)
        assert len(first) == 2 and not set(first) & set(cluster.client.job(straight).servers)
        cluster.wait_step(job_id, 30)
        steps = Steps(cluster, job_id)
        try:
            rates = []
            for servers in (4, 2):
                before = steps.rate(2.0)
                during, took = reshard(cluster, job_id, servers, steps)
                rates.append((servers, before, during, took))
        finally:
            steps.close()
        assert list(cluster.client.job(job_id).servers) == first  # drained the two it added
        final = cluster.final(job_id)
        assert final.state == common_pb2.JOB_STATE_COMPLETED, final.reason
        assert final.rollback_id == 0 and final.step == STEPS
        assert cluster.final(straight).state == common_pb2.JOB_STATE_COMPLETED
        reference = checkpointed_state(cluster, straight)
        moved = checkpointed_state(cluster, job_id)
        assert len(moved) == len(reference) == 4
        for a, b in zip(reference, moved, strict=True):
            assert a.version == STEPS
            assert_same_state(a, b)
        shown = cluster.cli("status", job_id)
        assert "reshard    done: 4 -> 2 servers, 2 of 2 moves done" in shown, shown
        for servers, before, during, took in rates:
            print(f"reshard to {servers} servers: {took:.2f} s; {before:.1f} steps/s before, "
                  f"{during:.1f} during")
        # It keeps stepping through each move. Its rate against the rate before is a speed
        # claim (issue 14: above half), measured by `python -m bench.reshard`: here, in a
        # suite sharing 2 cores, a 1-s window swung to 0.36-0.46 in runs of old and new code.
        for servers, _, during, _ in rates:
            assert during > 0, f"to {servers} servers: no step during the move"
    finally:
        cluster.stop()


@pytest.mark.timeout(240)
def test_an_async_job_resharded_loses_no_acknowledged_push(tmp_path):
    """async, 2 workers, 4 shards from 2 servers to 4 and back: every shard's version (async:
    pushes applied) equals the pushes the workers saw acknowledged."""
    cluster = Cluster(tmp_path, servers=4, workers=2,
                      worker_args=[["--step-delay-ms", STEP_DELAY_MS]] * 2)
    try:
        job_id = cluster.client.submit(spec("async", mode="async"))
        cluster.wait_step(job_id, 30)
        for servers in (4, 2):
            assert cluster.client.reshard(job_id, servers).moves_total == 2
            harness.poll(lambda: cluster.client.job(job_id).reshard.state == DONE, 60,
                         interval=0.05, what=f"the reshard to {servers} servers done")
        final = cluster.final(job_id)
        assert final.state == common_pb2.JOB_STATE_COMPLETED, final.reason
        assert_nothing_acknowledged_lost(cluster, job_id, final.shard_map.shards)
    finally:
        cluster.stop()


def info(address: str, job_id: str) -> list[ps_pb2.ShardInfo]:
    with rpc.make_channel(address) as channel:
        return list(ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
            ps_pb2.GetShardInfoRequest(job_id=job_id), timeout=rpc.CONTROL_DEADLINE_S).shards)


def test_refused_reshards_change_nothing(tmp_path):
    """`shardps reshard` with N beyond the servers there are, beyond the shards or below 1,
    of an unknown job or of one that has ended, is refused with a message naming what is
    wrong, and changes nothing (a reshard while one runs: tests/unit/test_resharding.py);
    one that can be done, with --wait, returns once its move is done."""
    cluster = Cluster(tmp_path, servers=3, workers=1,
                      worker_args=[["--step-delay-ms", STEP_DELAY_MS]])
    try:
        job_id = cluster.client.submit(spec("refused", 5000).replace("workers: 2", "workers: 1"))
        cluster.wait_step(job_id, 5)
        before = cluster.client.job(job_id).shard_map
        for n, message in [(4, "servers: 4 needs 2 more server(s) than the job's 2; only 1"),
                           (5, "servers: 5 > the job's 4 shards (cluster.shards)"),
                           (0, "servers: must be >= 1, got 0")]:
            out = harness.run_cli("reshard", job_id, "--servers", str(n), "--coordinator",
                                  cluster.coord.address, timeout=60)
            assert out.returncode != 0 and message in out.stderr, out.stderr
        out = harness.run_cli("reshard", "nope-000000", "--servers", "2", "--coordinator",
                              cluster.coord.address, timeout=60)
        assert out.returncode != 0 and "unknown job" in out.stderr, out.stderr
        info = cluster.client.job(job_id)
        assert info.shard_map == before and not info.reshard.moves_total
        assert info.reshard.state == coordinator_pb2.RESHARD_STATE_UNSPECIFIED
        shown = cluster.cli("reshard", job_id, "--servers", "3", "--wait")  # one shard moves
        assert "done: 2 -> 3 servers, 1 of 1 moves done" in shown, shown
        assert len({s.server_id for s in cluster.client.job(job_id).shard_map.shards}) == 3
        cluster.client.cancel(job_id)
        out = harness.run_cli("reshard", job_id, "--servers", "3", "--coordinator",
                              cluster.coord.address, timeout=60)
        assert out.returncode != 0 and "only a running job can be resharded" in out.stderr, \
            out.stderr
    finally:
        cluster.stop()
