"""Training semantics against plain PyTorch, on real daemons in this process (port 0).

Sync reproduces single-process `torch.optim.Adam` on the global batch; ssp never lets a worker
run more than `staleness` clocks ahead of the slowest (by the servers' own records); async
reaches the digits target; a diverging job fails and leaves nothing running.
"""

from __future__ import annotations

import pytest
import torch
from prometheus_client import generate_latest

from shardps.proto import common_pb2
from shardps.worker import tasks
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from shardps.worker.models import build_model
from tests.cluster import Cluster
from tests.harness import poll

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster():
    started = []

    def start(**kwargs) -> Cluster:
        started.append(Cluster(**kwargs))
        return started[-1]

    yield start
    for c in started:
        c.close()


def job_spec(mode="sync", workers=1, servers=1, **sections):
    spec = {
        "name": f"{mode}-w{workers}-s{servers}", "seed": 0,
        "model": {"name": "mlp", "kwargs": {"hidden": [128, 64]}},
        "data": {"dataset": "digits", "batch_size": 64, "shuffle": False},
        "optimizer": {"lr": 0.001},
        "consistency": {"mode": mode},
        "cluster": {"servers": servers, "workers": workers},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def single_process(spec, steps, **adam) -> dict[str, torch.Tensor]:
    """The job trained in this process: same seed, same global batches, torch.optim.Adam."""
    data = load_dataset(spec["data"]["dataset"], {}, spec["seed"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"]["name"], spec["model"]["kwargs"], data.info)
    opt = torch.optim.Adam(model.parameters(), lr=spec["optimizer"]["lr"], **adam)
    order = BatchOrder(data.num_train, spec["data"]["batch_size"], spec["data"]["shuffle"],
                       spec["seed"])
    for t in range(steps):
        opt.zero_grad()
        index = order.batch(t)
        tasks.loss(data.task, model(data.train_x[index]), data.train_y[index]).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def exported(c: Cluster, job_id: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The job's weights as `shardps export` writes them, and the shard versions."""
    return c.client.export(job_id)


STEPS = 50


def test_sync_one_worker_one_server_is_single_process_adam_bitwise(cluster):
    c = cluster(servers=1, workers=1)
    spec = job_spec(stop={"max_steps": STEPS, "eval_every": 1000})
    job = c.wait(c.submit(spec), timeout=120)
    assert job.state == common_pb2.JOB_STATE_COMPLETED, job.reason
    weights, versions = exported(c, job.job_id)
    assert versions == [STEPS]
    # The server runs torch's fused Adam: bitwise equal to it; the default (foreach) Adam
    # rounds differently, within 1e-6 after 50 steps.
    fused = single_process(spec, STEPS, fused=True)
    assert all(torch.equal(weights[k], fused[k]) for k in fused), max_abs_diff(weights, fused)
    diff = max_abs_diff(weights, single_process(spec, STEPS))
    print(f"1 worker, 1 server, {STEPS} sync steps: max |w - fused Adam| = 0, "
          f"max |w - default Adam| = {diff:.3g}")
    assert diff <= 1e-6


def test_sync_four_workers_three_servers_is_single_process_on_the_global_batch(cluster):
    c = cluster(servers=3, workers=4)
    spec = job_spec(workers=4, servers=3, stop={"max_steps": STEPS, "eval_every": 1000})
    job = c.wait(c.submit(spec), timeout=120)
    assert job.state == common_pb2.JOB_STATE_COMPLETED, job.reason
    weights, versions = exported(c, job.job_id)
    assert versions == [STEPS] * 3
    infos = c.shard_infos(job.job_id)
    assert [len(i.worker_clocks) for i in infos] == [4, 4, 4]
    assert all(set(i.worker_clocks.values()) == {STEPS} for i in infos)
    assert [i.pushes_applied for i in infos] == [4 * STEPS] * 3
    # Each worker's mean gradient over 16 samples, averaged with weights 16/64, equals the
    # global batch's mean up to float rounding, which Adam carries along.
    fused = max_abs_diff(weights, single_process(spec, STEPS, fused=True))
    default = max_abs_diff(weights, single_process(spec, STEPS))
    print(f"4 workers, 3 servers, {STEPS} sync steps: max |w - single process| = {fused:.3g} "
          f"(fused Adam), {default:.3g} (default Adam)")
    assert fused <= 1e-5 and default <= 1e-5


def test_ssp_never_runs_more_than_staleness_ahead_of_a_straggler_and_converges(cluster):
    # Rank order follows node ids, so the straggler's rank is whatever it gets.
    c = cluster(servers=1, step_delays_ms=[0, 0, 20])
    spec = job_spec("ssp", workers=3, data={"shuffle": True}, optimizer={"lr": 0.003},
                    consistency={"staleness": 2},
                    stop={"max_steps": 600, "eval_every": 10,
                          "target": {"metric": "accuracy", "value": 0.95}})
    job = c.wait(c.submit(spec), timeout=150)
    assert job.state == common_pb2.JOB_STATE_CONVERGED, job.reason
    straggler = c.workers[2].node_id
    for info in c.shard_infos(job.job_id):
        clocks = dict(info.worker_clocks)
        print(f"ssp s=2: max clock spread granted {info.max_clock_spread}, clocks {clocks}, "
              f"straggler {straggler}, converged at step {job.step}")
        # The bound held, and the straggler made it bind (so this check can fail).
        assert info.max_clock_spread == 2
        assert len(clocks) == 3 and max(clocks.values()) - clocks[straggler] <= 3
    text = generate_latest(c.servers[0].metrics_registry).decode()
    assert f'shardps_ps_max_clock_spread{{job="{job.job_id}",shard="0"}} 2.0' in text


def test_async_four_workers_reach_the_digits_target(cluster):
    c = cluster(servers=1, workers=4)
    spec = job_spec("async", workers=4, data={"shuffle": True},
                    stop={"max_steps": 1500, "eval_every": 10,
                          "target": {"metric": "accuracy", "value": 0.96}})
    job = c.wait(c.submit(spec), timeout=150)
    assert job.state == common_pb2.JOB_STATE_CONVERGED, job.reason
    assert job.best_metric >= 0.96
    print(f"async, 4 workers: accuracy {job.best_metric:.4f} at step {job.best_step}")
    # Workers push on until they hear the verdict; once the server has frozen the job (its
    # next heartbeat) nothing more is applied, so the counts below are read at rest.
    poll(lambda: c.frozen(job.job_id), 30, interval=0.05, what="the server freezing the job")
    (info,) = c.shard_infos(job.job_id)
    assert info.pushes_applied == info.version > job.best_step  # every push applied on arrival
    text = generate_latest(c.servers[0].metrics_registry).decode()
    count = _sample(text, f'shardps_ps_staleness_count{{job="{job.job_id}"}}')
    total = _sample(text, f'shardps_ps_staleness_sum{{job="{job.job_id}"}}')
    assert count == info.pushes_applied and total > 0  # pushes did arrive stale, and said so


def _sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


def test_non_finite_loss_fails_the_job_and_stops_every_loop(cluster):
    c = cluster(servers=1, workers=2)
    # lr 1e20: the first Adam step moves every weight by ~1e20, the next forward overflows.
    spec = job_spec(workers=2, optimizer={"lr": 1.0e20}, stop={"max_steps": 200})
    job = c.wait(c.submit(spec), timeout=120)
    assert job.state == common_pb2.JOB_STATE_FAILED
    assert "non-finite" in job.reason, job.reason
    print(f"lr 1e20: {job.reason}")
    # Workers go idle: no training thread, no assignment; servers freeze the job's shards
    # (pushes answer JOB_DONE, pulls never wait) once their heartbeat brings the verdict.
    poll(c.idle, 20, interval=0.05, what="every worker idle")
    poll(lambda: c.frozen(job.job_id), 20, interval=0.05, what="every shard frozen")
    assert all(not n.job_id for n in c.client.nodes() if n.role == common_pb2.ROLE_WORKER)
    (info,) = c.shard_infos(job.job_id)
    assert info.state == common_pb2.JOB_STATE_FAILED and info.version <= 2
    assert c.servers[0].shards.get(job.job_id, 0).waiting_pulls == 0



def test_sync_with_more_shards_than_servers_is_bitwise_the_run_with_a_server_per_shard(cluster):
    """cluster.shards: 4 shards on 2 servers (shard i on server i mod 2), each server holding
    two shards of the job, ends bit for bit where 4 shards on 4 servers end: where a shard
    lives changes nothing. (The shard boundaries do change the last bits of fused Adam, whose
    vector loop handles each shard's tail apart: compared with one process, within 1e-6.)"""
    c = cluster(servers=4, workers=1)
    stop = {"max_steps": STEPS, "eval_every": 1000}
    spread = c.wait(c.submit(job_spec(servers=4, stop=stop)), timeout=120)
    spec = job_spec(servers=2, cluster={"shards": 4}, stop=stop)
    job = c.wait(c.submit(spec), timeout=120)
    assert job.state == spread.state == common_pb2.JOB_STATE_COMPLETED, job.reason
    shards = job.shard_map.shards
    assert len(job.servers) == 2 and [s.index for s in shards] == [0, 1, 2, 3]
    assert [s.server_id for s in shards] == [job.servers[i % 2] for i in range(4)]
    held = {tuple(s.index for s in server.shards.shards(job.job_id)) for server in c.servers}
    assert held == {(0, 2), (1, 3), ()}
    assert ([(s.offset, s.length) for s in shards]
            == [(s.offset, s.length) for s in spread.shard_map.shards])
    weights, versions = exported(c, job.job_id)
    reference, _ = exported(c, spread.job_id)
    assert versions == [STEPS] * 4
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert max_abs_diff(weights, single_process(spec, STEPS, fused=True)) <= 1e-6
