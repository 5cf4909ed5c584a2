"""Server-initialised fixed tables over the wire (docs/tables.md, "Tables too big for a
worker"): the workers build the tables with `init=` (no weight), each server fills its rows
from init_rows at InitShard, and sync training equals one process with the same model
materialised (`tableinit.materialize`), torch's modules, SparseAdam and Adam."""

import functools

import grpc
import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.psclient.client import PSClient
from shardps.psclient.rows import RowClient
from shardps.server.ps.daemon import ParameterServerDaemon
from shardps.worker.datasets import load_dataset
from shardps.worker.tableinit import materialize
from tests.cluster import Cluster
from tests.integration.tablemodel import table_model, train_in_one_process

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
    train_in_one_process(model, data, functools.partial(torch.optim.SparseAdam, lr=LR),
                         steps=STEPS, batch=BATCH, lr=LR, seed=SEED)
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


def test_a_table_no_server_can_hold_is_refused_with_resource_exhausted():
    """InitShard of a server-initialised table of 2**50 rows (64 PB): RESOURCE_EXHAUSTED naming
    the table, no shard created; the server then takes a table it can hold."""
    server = ParameterServerDaemon(coordinator=None, metrics_port=-1).start()
    shard_map = common_pb2.ShardMap(version=1, shards=[common_pb2.ShardRange(
        index=0, server_id="s0", address=server.address, offset=0, length=8)])

    def config(rows: int) -> ps_pb2.ShardConfig:
        return ps_pb2.ShardConfig(
            optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                                 eps=1e-8),
            mode=common_pb2.CONSISTENCY_ASYNC, workers=["w0"], epoch=1,
            layout_fingerprint="test",
            tables=[ps_pb2.TableSpec(name="huge", dim=16, num_embeddings=rows, num_shards=1,
                                     optimizer="adagrad", lr=0.01, eps=1e-8,
                                     server_init=ps_pb2.ServerInit(kind="normal", b=1.0))])

    try:
        with PSClient("hj", shard_map, data_plane=False) as ps:
            with pytest.raises(grpc.RpcError) as refused:
                ps.init(torch.zeros(8), config(2**50))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "table 'huge': cannot allocate its 1125899906842624 rows" in refused.value.details()
            assert server.shards.shards("hj") == []
            ps.init(torch.zeros(8), config(1000))
        rows = RowClient("hj", shard_map)
        try:
            _, got = rows.pull_rows("huge", 0, torch.tensor([0, 999]), 16)
            assert got is not None and bool(got.ne(0).all())  # filled from init_rows
        finally:
            rows.close()
    finally:
        server.stop(0)
