"""Embedding tables served by real parameter servers over gRPC (docs/tables.md): sync
training of a model with an Embedding, an EmbeddingBag with offsets and dense layers equals
one process with torch's modules, SparseAdam on the tables and Adam on the dense part; and the
row RPCs refuse bad input with INVALID_ARGUMENT, changing nothing."""

import pytest
import torch

from shardps.proto import common_pb2
from shardps.proto.tables import FixedLayout, assemble_fixed
from shardps.worker import tasks
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from tests.cluster import Cluster
from tests.integration.tablemodel import table_model

pytestmark = pytest.mark.timeout(180)

STEPS, BATCH, LR, SEED = 10, 32, 0.01, 3
MODEL = "tests.integration.tablemodel:table_model"
TABLES = ("emb", "bag")


def spec(workers: int, servers: int) -> dict:
    return {"seed": SEED, "model": {"name": MODEL},
            "data": {"dataset": "digits", "batch_size": BATCH, "shuffle": False},
            "optimizer": {"lr": LR},
            "cluster": {"servers": servers, "workers": workers},
            "stop": {"max_steps": STEPS, "eval_every": STEPS}}


def reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process: torch's modules (sparse=True), SparseAdam on the tables, fused Adam (as
    the servers run it) on the dense part. Returns the dense flat vector and the tables."""
    data = load_dataset("digits", {}, SEED)
    torch.manual_seed(SEED)
    model = table_model(data.info, sparse=True)
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
    flat = torch.cat([p.detach().flatten() for p in dense])
    return flat, {name: getattr(model, name).weight.detach() for name in TABLES}


def served_tables(cluster: Cluster, job_id: str) -> dict[str, torch.Tensor]:
    """Each table in id order, assembled from the rows every shard holds."""
    shards = [s for server in cluster.servers for s in server.shards.shards(job_id)]
    assert sorted(s.index for s in shards) == list(range(len(cluster.servers)))
    out = {}
    for name in TABLES:
        num = {"emb": 17 * 8, "bag": 17 * 32}[name]
        layout = FixedLayout(name, num, len(shards))
        out[name] = assemble_fixed(layout, {s.index: s.table_rows(name) for s in shards})
    return out


@pytest.mark.parametrize(("workers", "servers", "tol"), [(1, 1, 1e-6), (3, 2, 1e-5)])
def test_sync_tables_match_sparse_adam_single_process(workers, servers, tol):
    cluster = Cluster(servers=servers, workers=workers)
    try:
        job_id = cluster.submit(spec(workers, servers))
        job = cluster.wait(job_id)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job
        # Every worker pushed every step to every shard.
        assert [i.pushes_applied for i in cluster.shard_infos(job_id)] == [STEPS * workers] * servers
        flat, tables = reference()
        served = served_tables(cluster, job_id)
        dense = cluster.weights(job_id)
        dense_diff = float((dense - flat).abs().max())
        table_diff = {n: float((served[n] - tables[n]).abs().max()) for n in TABLES}
        print(f"{workers} workers, {servers} servers: dense {dense_diff:.3g}, tables {table_diff}")
        assert dense.numel() == flat.numel()  # the tables stayed out of the flat layout
        assert dense_diff <= tol and max(table_diff.values()) <= tol
        # The tables moved: a frozen table would equal its initial rows.
        torch.manual_seed(SEED)
        initial = table_model(load_dataset("digits", {}, SEED).info)
        assert not torch.equal(served["emb"], initial.emb.weight.detach())
    finally:
        cluster.close()
