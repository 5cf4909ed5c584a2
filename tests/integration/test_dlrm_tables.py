"""The built-in dlrm with `tables: server` over real servers: a sync job of 3 workers on 2
servers reading a click log's files equals one process with the same model, its table a
torch sparse=True embedding under SparseAdam and the dense part under Adam."""

import pytest
import torch
import yaml

from shardps.client import ctrdata
from shardps.proto import common_pb2
from shardps.proto import spec as spec_lib
from shardps.worker import batchsource, tasks
from shardps.worker.models import build_model
from tests.cluster import Cluster
from tests.filereplay import rank_batches
from tests.integration.test_file_training import run_job

pytestmark = pytest.mark.timeout(180)

KWARGS = {"buckets": 64, "dim": 4, "bottom": [8], "top": [8], "tables": "server"}
STEPS, WORLD, BATCH, SEED, LR = 12, 3, 30, 3, 0.01


def spec_text(path) -> str:
    return yaml.safe_dump({
        "name": "dlrm-tables", "seed": SEED, "model": {"name": "dlrm", "kwargs": KWARGS},
        "data": {"dataset": "files", "batch_size": BATCH, "shuffle": False,
                 "files": {"path": str(path)}},
        "optimizer": {"lr": LR}, "cluster": {"servers": 2, "workers": WORLD},
        "stop": {"max_steps": STEPS, "eval_every": 5}})


def reference(path) -> dict[str, torch.Tensor]:
    """One process over global batch t = every rank's t-th batch: the table sparse=True under
    SparseAdam, fused Adam (as the servers run it) on the rest. Its state_dict."""
    data = batchsource.load_data(spec_lib.parse_spec(spec_text(path))["data"], seed=SEED)
    per_rank = [rank_batches(data, r, WORLD, BATCH, SEED, epochs=2) for r in range(WORLD)]
    torch.manual_seed(SEED)
    model = build_model("dlrm", KWARGS, data.info)
    model.table.sparse = True  # torch's own forward, a sparse gradient
    dense = [p for n, p in model.named_parameters() if not n.startswith("table.")]
    opts = [torch.optim.SparseAdam([model.table.weight], lr=LR),
            torch.optim.Adam(dense, lr=LR, fused=True)]
    for t in range(STEPS):
        parts = [batches[t] for batches in per_rank if batches[t] is not None]
        for opt in opts:
            opt.zero_grad()
        out = model(torch.cat([p.dense for p in parts]), torch.cat([p.cat for p in parts]))
        tasks.loss("binary", out, torch.cat([p.label for p in parts])).backward()
        for opt in opts:
            opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_dlrm_with_server_tables_equals_one_process(tmp_path):
    path = tmp_path / "log"
    ctrdata.write_ctr(path, rows=500, files=7, seed=1)
    cluster = Cluster(servers=2, lease_ms=5000)  # leases that a loaded machine keeps
    try:
        job_id, _, outcomes = run_job(cluster, spec_text(path), workers=WORLD)
        assert [o.kind for o in outcomes] == ["finished"] * WORLD, outcomes
        assert cluster.job(job_id).state == common_pb2.JOB_STATE_COMPLETED
        assert all(i.tables for i in cluster.shard_infos(job_id))  # the table is on the servers
        exported = cluster.client.export(job_id)[0]
        want = reference(path)
        assert exported.keys() == want.keys()
        assert exported["table.weight"].shape == (26 * 64, 4)
        diffs = {k: float((exported[k] - want[k]).abs().max()) for k in want}
        assert max(diffs.values()) <= 1e-5, diffs
        torch.manual_seed(SEED)  # the rows moved from where they started
        start = build_model("dlrm", KWARGS, batchsource.load_data(
            spec_lib.parse_spec(spec_text(path))["data"], seed=SEED).info)
        assert not torch.equal(exported["table.weight"], start.table.weight.detach())
    finally:
        cluster.close()
