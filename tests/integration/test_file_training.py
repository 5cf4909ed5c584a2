"""Training on a file dataset against the real coordinator and parameter servers: a sync job of
3 workers on 2 servers equals one process reading the same files in the documented order;
with 4 workers each opens only its own files; bad files fail the job naming the file."""

import os
import threading
import time

import numpy as np
import pytest
import torch
import yaml

from shardps.client import ctrdata
from shardps.proto import common_pb2
from shardps.proto import spec as spec_lib
from shardps.worker import batchsource, tasks
from shardps.worker.fileplan import Place
from shardps.worker.models import build_model
from shardps.worker.trainer import Trainer
from tests.cluster import ALIVE, Cluster, RegisteredWorker
from tests.filereplay import rank_batches
from tests.harness import poll

pytestmark = pytest.mark.timeout(180)

MODEL = {"name": "dlrm", "kwargs": {"buckets": 64, "dim": 4, "bottom": [8], "top": [8]}}


def spec_text(path, workers, servers=2, steps=18, batch_size=30, shuffle=False, **files):
    return yaml.safe_dump({
        "name": "files", "seed": 3, "model": MODEL,
        "data": {"dataset": "files", "batch_size": batch_size, "shuffle": shuffle,
                 "files": {"path": str(path), **files}},
        "optimizer": {"lr": 0.01},
        "cluster": {"servers": servers, "workers": workers},
        "stop": {"max_steps": steps, "eval_every": 5}})


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """A click log of 500 rows in 7 files of 71-72 rows (the last held out for testing)."""
    out = tmp_path_factory.mktemp("ctr") / "log"
    ctrdata.write_ctr(out, rows=500, files=7, seed=1)
    return out


def run_job(cluster, text, workers):
    """Registers `workers` nodes, submits, runs their Trainers in threads to the end."""
    nodes = [RegisteredWorker(cluster.stub) for _ in range(workers)]
    try:
        job_id = cluster.submit(text)
        for node in nodes:
            assert node.wait_assignment().job_id == job_id
        nodes.sort(key=lambda n: n.assignment.rank)
        trainers = [Trainer(cluster.stub, n.node_id, n.incarnation, n.assignment) for n in nodes]
        outcomes: list = [None] * workers
        threads = [threading.Thread(target=lambda i=i: outcomes.__setitem__(i, trainers[i].run()))
                   for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        return job_id, trainers, outcomes
    finally:
        for node in nodes:
            node.stop()


def load(path):
    return batchsource.load_data(spec_lib.parse_spec(spec_text(path, 1))["data"], seed=3)


def reference_weights(path, steps, world=3, batch_size=30, seed=3):
    """One process: Adam (fused, as the servers run it) on global batch t = every rank's t-th
    batch, concatenated."""
    data = load(path)
    per_rank = [rank_batches(data, r, world, batch_size, seed, epochs=2) for r in range(world)]
    torch.manual_seed(seed)
    model = build_model(MODEL["name"], MODEL["kwargs"], data.info)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    for t in range(steps):
        parts = [batches[t] for batches in per_rank if batches[t] is not None]
        opt.zero_grad()
        out = model(torch.cat([p.dense for p in parts]), torch.cat([p.cat for p in parts]))
        tasks.loss("binary", out, torch.cat([p.label for p in parts])).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_three_sync_workers_on_two_servers_equal_one_process_reading_the_files(log):
    # 6 train files of ~71 rows (428): 15 steps an epoch (ceil(428 / 30)); each rank reads 2
    # (~143 rows) in batches of 10, so 18 steps cross into epoch 1 (a new assignment) and
    # batches span two files.
    cluster = Cluster(servers=2, lease_ms=5000)  # leases that a loaded machine keeps
    try:
        job_id, trainers, outcomes = run_job(cluster, spec_text(log, workers=3), workers=3)
        # A worker whose last report reaches the coordinator after another's completed the job is
        # told so ("stopped", the job COMPLETED) rather than finding the budget itself (seen once
        # in a loaded suite); either way it pushed every step, which the weights check.
        assert all(o.kind == "finished" or (o.kind == "stopped" and "JOB_STATE_COMPLETED" in o.reason)
                   for o in outcomes), outcomes
        torch.testing.assert_close(cluster.weights(job_id), reference_weights(log, 18), atol=1e-5, rtol=0)
        job = cluster.job(job_id, history=True)
        assert job.state == common_pb2.JOB_STATE_COMPLETED
        assert [e.metric for e in job.evals if e.step == 18] == ["auc", "logloss", "loss"]
        assert 0 < [e.value for e in job.evals if e.metric == "auc"][-1] < 1
    finally:
        cluster.close()


def test_four_workers_each_open_only_their_own_files(tmp_path):
    # 9 train files of 40 rows, 4 ranks: 3, 2, 2, 2 files; 13 steps an epoch (ceil(360 / 28)),
    # in batches of 10, 7, 7 and 7 rows; 40 steps reach epoch 3.
    path = tmp_path / "log"
    ctrdata.write_ctr(path, rows=400, files=10, seed=2)
    cluster = Cluster(servers=1, lease_ms=5000)
    try:
        job_id, trainers, outcomes = run_job(
            cluster, spec_text(path, workers=4, servers=1, steps=40, batch_size=28, shuffle=True), workers=4)
        assert [o.kind for o in outcomes] == ["finished"] * 4, outcomes
        data = load(path)
        source = batchsource.FileSource(data, 28, True, 3)
        for rank, tr in enumerate(trainers):
            last = 39 // source.steps_per_epoch
            done = [f for e in range(last) for f in source.plan(Place(rank, 4), e).files]
            own = done + list(source.plan(Place(rank, 4), last).files)
            opened = tr._source.stats.files_opened
            # Its own files, in order, each once an epoch: every file of the epochs it finished,
            # then as far into the last one as it had read (ahead) when the job ended.
            assert last >= 2 and len(done) <= len(opened) and opened == own[:len(opened)], rank
            assert tr.metrics.files_read.labels(job=job_id)._value.get() == len(opened)
        every = [f for tr in trainers for f in tr._source.stats.files_opened]
        assert set(every) == set(data.train_files)  # no file is left out, none read twice an epoch
    finally:
        cluster.close()


def corrupt(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def wrong_schema(path):
    np.save(path, np.zeros(5, dtype=[("label", "u1"), ("dense", "<f4", (13,))]))


def unreadable(path):
    os.remove(path)
    os.mkdir(path)


@pytest.mark.parametrize("damage, problem", [
    (os.remove, "no such file"),
    (corrupt, "corrupt: "),
    (wrong_schema, "schema mismatch"),
    (unreadable, "is a directory, not a file"),
])
def test_a_bad_file_fails_the_job_naming_it_and_no_worker_retries(tmp_path, damage, problem):
    path = tmp_path / "log"
    ctrdata.write_ctr(path, rows=300, files=5, seed=3)
    bad = str(path / "part-00002.npy")
    damage(bad)
    cluster = Cluster(servers=1, workers=2)
    try:
        job_id = cluster.submit(spec_text(path, workers=2, servers=1, steps=200))
        job = cluster.wait(job_id, timeout=120)
        assert job.state == common_pb2.JOB_STATE_FAILED
        assert f"{bad}: {problem}" in job.reason
        # The workers stay up, registered once, and idle: the failed job is not started again.
        poll(cluster.idle, 30, interval=0.1, what="workers idle")
        incarnations = [w.incarnation for w in cluster.workers]
        time.sleep(3)  # more than a lease period (2 s), in which a crash loop would show
        assert [w.incarnation for w in cluster.workers] == incarnations
        assert cluster.idle()
        assert sum(n.state == ALIVE for n in cluster.client.nodes()) == 3
    finally:
        cluster.close()


def test_skip_bad_trains_around_a_bad_file(tmp_path):
    path = tmp_path / "log"
    ctrdata.write_ctr(path, rows=300, files=5, seed=3)
    corrupt(path / "part-00001.npy")
    text = spec_text(path, workers=2, servers=1, steps=12, skip_bad=True)
    cluster = Cluster(servers=1, workers=2)
    try:
        job = cluster.wait(cluster.submit(text), timeout=120)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job.reason
        # The skipped file's rows are missing: its steps were empty for the rank that owned it.
        assert 0 < job.samples < 12 * 30
    finally:
        cluster.close()
