"""Server-initialised fixed tables over the wire (docs/tables.md, "Tables too big for a
worker"): the workers build the tables with `init=` (no weight), each server fills its rows
from init_rows at InitShard, and sync training equals one process with the same model
materialised (`tableinit.materialize`), torch's modules, SparseAdam and Adam."""

import pytest
import torch

from shardps.proto import common_pb2
from shardps.worker import tasks
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from shardps.worker.tableinit import materialize
from tests.cluster import Cluster
from tests.integration.tablemodel import table_model

pytestmark = pytest.mark.timeout(180)

STEPS, BATCH, LR, SEED = 8, 32, 0.01, 5
MODEL = "tests.integration.tablemodel:table_model"
INIT = {"kind": "uniform", "a": -0.3, "b": 0.3}
KWARGS = {"server_init": INIT, "padding_idx": 0}  # pixel 16 at level 0: in most samples
TABLES = ("emb", "bag")


def spec(workers: int, servers: int) -> dict:
    return {"seed": SEED, "model": {"name": MODEL, "kwargs": KWARGS},
            "data": {"dataset": "digits", "batch_size": BATCH, "shuffle": False},
            "optimizer": {"lr": LR}, "consistency": {"mode": "sync"},
            "cluster": {"servers": servers, "workers": workers},
            "stop": {"max_steps": STEPS}}


def reference() -> torch.nn.Module:
    """One process: the same factory under the job's seed, its tables materialised, then
    SparseAdam on them and fused Adam (as the servers run it) on the dense part."""
    data = load_dataset("digits", {}, SEED)
    torch.manual_seed(SEED)
    model = table_model(data.info, sparse=True, **KWARGS)
    assert materialize(model) == list(TABLES)
    tables = [p for n, p in model.named_parameters() if n.split(".")[0] in TABLES]
    dense = [p for n, p in model.named_parameters() if n.split(".")[0] not in TABLES]
    opts = [torch.optim.SparseAdam(tables, lr=LR), torch.optim.Adam(dense, lr=LR, fused=True)]
    order = BatchOrder(data.num_train, BATCH, False, SEED)
    for t in range(STEPS):
        for opt in opts:
            opt.zero_grad()
        index = order.batch(t)
        tasks.loss(data.task, model(data.train_x[index]), data.train_y[index]).backward()
        for opt in opts:
            opt.step()
    return model


@pytest.mark.parametrize(("workers", "servers", "tol"), [(1, 1, 1e-6), (2, 2, 1e-5)])
def test_server_initialised_tables_train_like_the_materialised_model(workers, servers, tol,
                                                                      tmp_path):
    cluster = Cluster(servers=servers, workers=workers)
    try:
        job_id = cluster.submit(spec(workers, servers))
        job = cluster.wait(job_id)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job
        ref = reference()
        path = tmp_path / "model.pt"
        cluster.client.export_to(job_id, path)
        exported = torch.load(path, weights_only=True)
        expected = ref.state_dict()
        assert sorted(exported) == sorted(expected)
        diffs = {k: float((exported[k] - v).abs().max()) for k, v in expected.items()}
        print(f"{workers} workers, {servers} servers: {diffs}")
        assert max(diffs.values()) <= tol, diffs
        assert exported["emb.weight"][0].eq(0).all()  # the padding row started and stayed zero
        # The rows started from init_rows, not from a worker: the first step moved only the
        # rows it touched, every other row is still in [a, b) of the uniform init.
        assert exported["bag.weight"].abs().max() <= 0.3 + STEPS * LR * 1.01
    finally:
        cluster.close()
