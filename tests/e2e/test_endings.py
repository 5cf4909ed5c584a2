"""How jobs end, every daemon a real process (docs/architecture.md, "Job life cycle" 7 and
"A full stop"): a verdict names the final version and every shard ends there; the final
weights are checkpointed, so a server SIGKILLed after the end restores them and export finds
it at its new address; export refuses shards at different versions; step reports that
arrive after the end still count; a full stop ends the same way whatever the shutdown order.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from shardps.client.api import CoordinatorClient
from shardps.client.scrape import scrape, total
from shardps.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc, ps_pb2, ps_pb2_grpc
from shardps.psclient import client as psclient
from shardps.runtime import rpc
from shardps.server.ps import checkpoint
from tests import harness
from tests.cluster import RegisteredWorker
from tests.e2e.test_recovery import Cluster, spec

COMPLETED = common_pb2.JOB_STATE_COMPLETED
FAILED = common_pb2.JOB_STATE_FAILED


def export(cluster: Cluster, job_id: str, path: Path) -> tuple[dict, dict]:
    """`shardps export` (JSON) and the state_dict it wrote."""
    out = json.loads(cluster.cli("export", job_id, "-o", str(path), "--output", "json"))
    return out, torch.load(path, weights_only=True)


def shard_infos(cluster: Cluster, job_id: str) -> list[ps_pb2.ShardInfo]:
    """Each shard of the job as its server reports it, in shard order."""
    infos = []
    for shard in cluster.client.job(job_id).shard_map.shards:
        with rpc.make_channel(shard.address) as channel:
            reply = ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
                ps_pb2.GetShardInfoRequest(job_id=job_id), timeout=rpc.CONTROL_DEADLINE_S)
        infos += [s for s in reply.shards if s.shard_index == shard.index]
    return infos


def shard_versions(cluster: Cluster, job_id: str) -> list[int]:
    return [s.version for s in shard_infos(cluster, job_id)]


def checkpoint_versions(cluster: Cluster, server: int, job_id: str, index: int) -> list[int]:
    shard_dir = checkpoint.shard_dir(cluster.data_dirs[server], job_id, index)
    return [v for v, _ in checkpoint.committed(shard_dir)] if shard_dir.exists() else []


@pytest.mark.timeout(420)
def test_a_server_killed_after_the_end_restores_the_final_version_and_export_finds_it(tmp_path):
    """13 steps, checkpoints every 5: the final version is not a periodic one. The servers
    checkpoint it when the job ends; the server of shard 1, SIGKILLed afterwards and
    restarted on another port, restores it, and export reads the same weights from its new
    address. With that checkpoint gone, the restart restores version 10 and export refuses
    the mixed model, naming the shards and their versions."""
    steps, every = 13, 5
    last_periodic = steps // every * every  # 10
    cluster = Cluster(tmp_path, servers=2, workers=2)
    try:
        job_id = cluster.client.submit(spec(steps=steps, every=every, eval_every=1000))
        final = cluster.final(job_id)
        assert final.state == COMPLETED, final.reason
        assert final.final_version == steps
        victim = cluster.server_of_shard(job_id, 1)
        harness.poll(lambda: steps in checkpoint_versions(cluster, victim, job_id, 1), 60,
                     what="the final version's checkpoint")
        before, weights = export(cluster, job_id, tmp_path / "before.pt")
        assert [int(v) for v in before["versions"]] == [steps, steps]

        old_address = cluster.servers[victim].address
        cluster.servers[victim].kill()  # SIGKILL
        restarted = cluster.restart_server(victim)
        assert restarted.address != old_address
        assert restarted.has_line(rf"job {job_id} shard 1 restored from ckpt-0*{steps}-")
        after, again = export(cluster, job_id, tmp_path / "after.pt")
        assert [int(v) for v in after["versions"]] == [steps, steps]
        assert weights.keys() == again.keys()
        for name, tensor in weights.items():
            assert torch.equal(tensor, again[name]), name

        cluster.servers[victim].kill()
        shard_dir = checkpoint.shard_dir(cluster.data_dirs[victim], job_id, 1)
        for version, path in checkpoint.committed(shard_dir):
            if version > last_periodic:
                shutil.rmtree(path)  # the final checkpoint lost: the newest left is the last periodic one
        cluster.restart_server(victim)
        out = harness.run_cli("export", job_id, "-o", str(tmp_path / "mixed.pt"),
                              "--coordinator", cluster.coord.address, timeout=120)
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"the job's final version is {steps}" in out.stderr, out.stderr
        assert f"shard 1 on {final.servers[1]} at version {last_periodic}" in out.stderr, out.stderr
        assert f"shard 0 on {final.servers[0]} at version {steps}" in out.stderr, out.stderr
        assert "refusing to export a mixed model" in out.stderr
        assert not (tmp_path / "mixed.pt").exists()
    finally:
        cluster.stop()


@pytest.mark.timeout(420)
def test_a_verdict_names_the_version_every_shard_freezes_at(tmp_path):
    """A target reached at an evaluation: the verdict's final version is that evaluation's
    step, every shard is there and stays there, and export says so."""
    cluster = Cluster(tmp_path, servers=2, workers=2,
                      worker_args=[["--step-delay-ms", "5"], []])
    try:
        job_id = cluster.client.submit(spec(steps=3000, every=0, eval_every=20,
                                            target="target: {metric: accuracy, value: 0.5}"))
        final = cluster.final(job_id)
        assert final.state == common_pb2.JOB_STATE_CONVERGED, final.reason
        verdict_step = final.evals[-1].step
        assert f"at step {verdict_step}" in final.reason
        assert final.final_version == verdict_step
        harness.poll(lambda: all(s.state == common_pb2.JOB_STATE_CONVERGED
                                 for s in shard_infos(cluster, job_id)), 30,
                     what="every shard frozen")
        assert shard_versions(cluster, job_id) == [verdict_step, verdict_step]
        out = cluster.cli("export", job_id, "-o", str(tmp_path / "m.pt"))
        assert f"version {verdict_step}" in out
        time.sleep(1.0)  # several server heartbeats: nothing moves any more
        assert shard_versions(cluster, job_id) == [verdict_step, verdict_step]
    finally:
        cluster.stop()


@pytest.mark.timeout(420)
def test_a_cancel_while_one_server_is_paused_ends_every_shard_at_one_version(tmp_path):
    """The two servers learn of a cancel at different times: the server of shard 1 is
    SIGSTOPped, the job cancelled, and it is let go a moment later, with the workers' pushes
    of the open round queued at it. Either it applies that round before its heartbeat tells
    it of the end (then shard 0, which held its pushes, closes the same round when the
    coordinator names the final version) or after (then neither applies it): every shard
    ends at the named final version, and the weights stay there."""
    cluster = Cluster(tmp_path, servers=2, workers=2,
                      worker_args=[["--step-delay-ms", "10"], ["--step-delay-ms", "10"]])
    try:
        job_id = cluster.client.submit(spec(steps=100_000, every=0, eval_every=100_000))
        cluster.wait_step(job_id, 30)
        paused = cluster.servers[cluster.server_of_shard(job_id, 1)]
        paused.signal(signal.SIGSTOP)
        try:
            time.sleep(0.2)  # the workers' next round reaches it and waits there
            assert cluster.client.cancel(job_id) == common_pb2.JOB_STATE_CANCELLED
            time.sleep(1.0)  # shard 0's server learns of it; shard 1's cannot yet
        finally:
            paused.signal(signal.SIGCONT)
        named = harness.poll(lambda: (j := cluster.client.job(job_id)).final_version >= 0 and j,
                             30, what="the final version named")
        final = named.final_version
        harness.poll(lambda: shard_versions(cluster, job_id) == [final, final], 30,
                     what=f"every shard at version {final}")
        out = cluster.cli("export", job_id, "-o", str(tmp_path / "m.pt"))
        assert f"version {final}" in out
        time.sleep(1.0)
        assert shard_versions(cluster, job_id) == [final, final]
        print(f"cancelled: final version {final}")
    finally:
        cluster.stop()


@pytest.mark.timeout(300)
def test_step_reports_arriving_after_the_end_still_count(tmp_path):
    """A 2-worker sync job whose rank 1 is this test (a registered worker pushing zero
    gradients): it reports its last step only after rank 0's finished report has completed
    the job. That report still goes into the history: the last loss point and the job's
    loss are the batch-weighted mean of both ranks' losses, not rank 0's alone."""
    steps, rank1_loss = 6, 0.5
    lease_ms = 4000
    coord = harness.start("shardps-coordinator", "--port", "0", "--lease-ms", str(lease_ms))
    server = harness.start("shardps-server", "--port", "0", "--coordinator", coord.address)
    worker = harness.start("shardps-worker", "--port", "0", "--metrics-port", "0",
                           "--device", "cpu", "--threads", "1", "--coordinator", coord.address)
    channel = rpc.make_channel(coord.address)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    client = CoordinatorClient(coord.address)
    me = None
    try:
        me = _register_after_the_real_worker(stub, client)
        job_id = client.submit(spec(steps=steps, servers=1, workers=2, every=0,
                                    eval_every=1000))
        assignment = me.wait_assignment(30)
        assert assignment.rank == 1
        job = harness.poll(lambda: (j := client.job(job_id)).state == common_pb2.JOB_STATE_RUNNING
                           and j, 60, what="job running")
        _train_as_rank1(stub, me, job, steps, rank1_loss)
        ended = client.wait(job_id, timeout_s=60, interval_s=0.05)
        assert ended.state == COMPLETED, ended.reason
        reply = stub.ReportProgress(coordinator_pb2.ReportProgressRequest(
            job_id=job_id, node_id=me.node_id, incarnation=me.incarnation,
            steps=[coordinator_pb2.StepReport(step=steps - 1, loss=rank1_loss, samples=32)]),
            timeout=10)
        assert reply.state == COMPLETED
        rank0_loss = total(scrape(worker.metrics_address), "shardps_worker_loss", job=job_id)
        want = (rank0_loss * 32 + rank1_loss * 32) / 64
        info = harness.poll(lambda: (j := client.job(job_id, history=True)).losses
                            and j.losses[-1].step == steps - 1 and j, 30, what="last loss point")
        assert info.losses[-1].loss == pytest.approx(want, rel=1e-12)
        assert info.loss == pytest.approx(want, rel=1e-12)
        assert next(w.step for w in info.workers if w.node_id == me.node_id) == steps - 1
    finally:
        if me is not None:
            me.stop()
        client.close()
        channel.close()
        for d in (worker, server, coord):
            d.stop()


def _register_after_the_real_worker(stub, client):
    """Registers this test as a worker whose node id sorts after the real worker's (ranks
    follow node ids), so that it is rank 1: generated ids are hex, and "z" sorts after every
    hex digit."""
    real = harness.poll(lambda: next((n.node_id for n in client.nodes()
                                      if n.role == common_pb2.ROLE_WORKER), None), 60,
                        what="the worker registered")
    me = RegisteredWorker(stub, node_id="worker-zzzzzzzz")
    assert me.node_id > real
    return me


def _train_as_rank1(stub, me, job, steps, loss):
    """Rank 1's sync steps: pull, push zero gradients, and report every step but the last."""
    flat = torch.zeros(job.layout.total)
    with psclient.PSClient(job.job_id, job.shard_map, worker_id=me.node_id,
                           incarnation=me.incarnation) as ps:
        for step in range(steps):
            assert ps.pull(flat, min_version=step, timeout_s=30).ready
            ps.push(torch.zeros(job.layout.total), step=step, base_version=step,
                    batch_size=32)
            if step < steps - 1:
                stub.ReportProgress(coordinator_pb2.ReportProgressRequest(
                    job_id=job.job_id, node_id=me.node_id, incarnation=me.incarnation,
                    steps=[coordinator_pb2.StepReport(step=step, loss=loss, samples=32)]),
                    timeout=10)


def _stop_all(daemons: list[harness.Daemon]) -> None:
    """SIGTERM to each at once, then wait for every one to exit."""
    for d in daemons:
        d.signal(signal.SIGTERM)
    for d in daemons:
        d.wait(60)


SHUTDOWN_ORDERS = {
    # name: groups stopped one after the other (each group: SIGTERM at once, all exited)
    "at once": lambda c: [[c.coord, *c.servers, *c.workers]],
    "workers first": lambda c: [c.workers, [c.coord, *c.servers]],
    "coordinator first": lambda c: [[c.coord], [*c.servers, *c.workers]],
    "one worker, then the coordinator": lambda c: [c.workers[:1], [c.coord],
                                                   [*c.servers, *c.workers[1:]]],
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("order", list(SHUTDOWN_ORDERS))
def test_a_full_stop_ends_the_same_way_whatever_the_shutdown_order(tmp_path, order):
    """SIGTERM every daemon of a running sync job (in one of several orders: whether the
    workers' goodbyes reach the coordinator before it stops decides whether the job ends
    before the stop, shrinks, or stays RUNNING), then restart each with its dirs and new
    workers. Always: the old job takes none of the new workers and ends FAILED (all workers
    lost), and `shardps resume` continues it from its checkpoints to the end."""
    steps = 200
    cluster = Cluster(tmp_path, servers=2, workers=2, state_dir=True,
                      worker_args=[["--step-delay-ms", "15"], ["--step-delay-ms", "15"]])
    try:
        job_id = cluster.client.submit(spec(steps=steps, every=50, name="stopped"))
        cluster.wait_step(job_id, 30)
        for group in SHUTDOWN_ORDERS[order](cluster):
            _stop_all(group)
    finally:
        cluster.stop()
    cluster = Cluster(tmp_path, servers=2, workers=2, state_dir=True, wait_alive=False)
    try:
        new_id = cluster.cli("resume", job_id).strip()
        old = cluster.client.job(job_id)
        assert old.state == FAILED and old.reason == "all workers lost", old.reason
        assert len(old.workers) == 2  # the two it had: no new worker joined it
        final = cluster.final(new_id)
        assert final.state == COMPLETED, final.reason
        assert final.resume_from == job_id and final.step == steps
        print(f"{order}: {job_id} {common_pb2.JobState.Name(old.state)}; resumed as {new_id}")
    finally:
        cluster.stop()


@pytest.mark.timeout(300)
def test_a_rank_that_learns_of_the_end_first_still_delivers_its_last_steps(tmp_path):
    """Real workers; rank 1 waits 1.5 s before its last report at the step budget (fault
    injection), so rank 0's finished report completes the job first and rank 1's daemon
    stops its training on the next heartbeat. It still sends its pending step reports as it
    stops, and they count: the last loss point is the mean of both ranks' last losses."""
    steps = 40
    late = {"SHARDPS_FAULT_LATE_FINISH_MS": "1500"}  # only ranks other than 0 wait
    coord = harness.start("shardps-coordinator", "--port", "0", "--lease-ms", "2000")
    server = harness.start("shardps-server", "--port", "0", "--coordinator", coord.address)
    workers = [harness.start("shardps-worker", "--port", "0", "--metrics-port", "0",
                             "--device", "cpu", "--threads", "1", "--coordinator",
                             coord.address, env=late) for _ in range(2)]
    client = CoordinatorClient(coord.address)
    try:
        harness.poll(lambda: len(client.nodes()) == 3, 60, what="every node registered")
        job_id = client.submit(spec(steps=steps, servers=1, workers=2, every=0,
                                    eval_every=1000))
        ended = client.wait(job_id, timeout_s=120, interval_s=0.05)
        assert ended.state == COMPLETED, ended.reason
        info = harness.poll(lambda: (j := client.job(job_id, history=True)).losses
                            and all(w.step == steps - 1 for w in j.workers) and j, 30,
                            what="both ranks' last step reports")
        losses = [total(scrape(w.metrics_address), "shardps_worker_loss", job=job_id)
                  for w in workers]
        want = sum(losses) / 2  # 32 samples each
        assert info.losses[-1].step == steps - 1
        assert info.losses[-1].loss == pytest.approx(want, rel=1e-12)
        assert info.loss == pytest.approx(want, rel=1e-12)
        assert any(w.has_line(f"job {job_id} stopped") for w in workers)
    finally:
        client.close()
        for d in (*workers, server, coord):
            d.stop()
