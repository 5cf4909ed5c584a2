"""Dynamic embedding tables served by real parameter servers over gRPC (docs/tables.md):
issue 12's dynamic acceptance (ids from the whole int64 range, 10x more distinct ids than a
server's row cap, a falling loss, every server within its cap, admissions and evictions on
the servers' /metrics), sync training equal to one process with torch's modules, and
async training with admission."""

import functools
import urllib.request

import grpc
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shardps.proto import common_pb2, ps_pb2
from shardps.proto import spec as spec_lib
from shardps.proto.tables import RowInit, dynamic_server_of, init_rows
from shardps.psclient.client import PSClient
from shardps.psclient.rows import RowClient
from shardps.server.ps.daemon import ParameterServerDaemon
from shardps.worker import tasks
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from shardps.worker.embedding import Embedding
from shardps.worker.exported import load_exported
from shardps.worker.tablesync import TableSync
from tests.cluster import Cluster
from tests.harness import poll
from tests.integration.dynmodel import dyn_model, ids_of

pytestmark = pytest.mark.timeout(240)

SEED, BATCH, DIM = 4, 32, 4
MODEL = "tests.integration.dynmodel:dyn_model"
DATA = "tests.integration.dynmodel:dyn_data"
INIT = RowInit("normal", 0.0, 0.1)  # DynModel's


def spec(workers: int, servers: int, steps: int, mode: str = "sync", **tables) -> dict:
    return {"seed": SEED, "model": {"name": MODEL},
            "data": {"dataset": DATA, "batch_size": BATCH, "shuffle": False},
            "optimizer": {"lr": 0.01}, "consistency": {"mode": mode},
            "cluster": {"servers": servers, "workers": workers},
            "stop": {"max_steps": steps, "eval_every": 1000},
            "tables": {"lr": 0.05, **tables}}


def metrics_cluster(servers: int, workers: int) -> Cluster:
    """A Cluster whose servers serve /metrics over HTTP (port 0)."""
    cluster = Cluster(servers=0)
    cluster.servers = [ParameterServerDaemon(coordinator=cluster.address, metrics_port=0).start()
                       for _ in range(servers)]
    for _ in range(workers):
        cluster.add_worker()
    cluster.wait_alive()
    return cluster


def scrape(server: ParameterServerDaemon, job_id: str) -> dict[tuple[str, ...], float]:
    """The table samples of `job_id` on a server's /metrics: (name, shard, reason) -> value."""
    url = f"http://{server.metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("shardps_ps_table_") and sample.labels.get("job") == job_id:
                assert sample.labels["table"] == "bag"
                out[(sample.name, sample.labels["shard"], sample.labels.get("reason", ""))] = sample.value
    return out


def test_a_job_with_ten_times_more_ids_than_the_cap_learns_within_the_cap():
    """Issue 12's dynamic acceptance over the wire: 1 worker, 2 servers, sync, a cap of 300
    rows per server (a per_table setting) and idle eviction after 6 steps."""
    steps, cap = 150, 300
    cluster = metrics_cluster(servers=2, workers=1)
    try:
        job_id = cluster.submit(spec(1, 2, steps, evict_after_steps=6,
                                     per_table={"bag": {"max_rows": cap}}))
        held: list[float] = []

        def sample() -> bool:  # the rows every server holds, read while the job runs
            for server in cluster.servers:
                held.extend(v for (name, _, _), v in scrape(server, job_id).items()
                            if name == "shardps_ps_table_rows")
            return cluster.job(job_id).state in (common_pb2.JOB_STATE_COMPLETED,
                                                 common_pb2.JOB_STATE_FAILED)

        poll(sample, timeout=180, interval=0.2, what="the job to end")
        job = cluster.wait(job_id)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job
        assert held and max(held) <= cap, max(held)
        # It saw more than 10x a server's cap in distinct ids, from the whole int64 range.
        data = load_dataset(DATA, {}, SEED)
        seen = ids_of(data.train_x[: steps * BATCH]).flatten()
        assert torch.unique(seen).numel() > 10 * cap
        assert int(seen.min()) < -(2**62) and int(seen.max()) > 2**62
        losses = [p.loss for p in sorted(job.losses, key=lambda p: p.step)]
        print(f"distinct ids {torch.unique(seen).numel()}, max rows held {max(held)}, loss "
              f"{sum(losses[:20]) / 20:.3f} -> {sum(losses[-20:]) / 20:.3f}")
        assert len(losses) >= 100 and sum(losses[-20:]) < 0.5 * sum(losses[:20]), losses
        idle = 0.0
        for server in cluster.servers:
            got = scrape(server, job_id)
            shard = next(s for (_, s, _) in got)
            print({f"{name.removeprefix('shardps_ps_table_')}{'/' + why if why else ''}": v
                   for (name, _, why), v in got.items()})
            assert 0 < got[("shardps_ps_table_rows", shard, "")] <= cap
            assert got[("shardps_ps_table_bytes", shard, "")] > 0
            assert got[("shardps_ps_table_admissions_total", shard, "")] > 10 * cap
            assert got[("shardps_ps_table_evictions_total", shard, "cap")] > 5 * cap
            idle += got[("shardps_ps_table_evictions_total", shard, "idle")]
        assert idle > 0  # rows untouched for evict_after_steps, before the cap took them
    finally:
        cluster.close()


def reference(steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """One process with torch's modules: the dynamic table as a torch EmbeddingBag
    (sparse=True) over every id the steps touch, starting from init_rows, SparseAdam on it and
    fused Adam on the dense part. Returns (dense flat, ids, rows, model with that table)."""
    data = load_dataset(DATA, {}, SEED)
    order = BatchOrder(data.num_train, BATCH, False, SEED)
    batches = [order.batch(t) for t in range(steps)]
    every = torch.unique(torch.cat([ids_of(data.train_x[b]).flatten() for b in batches]))
    torch.manual_seed(SEED)
    model = dyn_model(data.info)
    table = torch.nn.EmbeddingBag(every.numel(), DIM, mode="sum", sparse=True,
                                  _weight=init_rows(SEED, "bag", every, DIM, INIT))
    opts = [torch.optim.SparseAdam(table.parameters(), lr=0.05),
            torch.optim.Adam(model.head.parameters(), lr=0.01, fused=True)]
    for index in batches:
        for opt in opts:
            opt.zero_grad()
        x = data.train_x[index]
        out = model.head(table(torch.searchsorted(every, ids_of(x))))
        tasks.loss(data.task, out, data.train_y[index]).backward()
        for opt in opts:
            opt.step()
    dense = torch.cat([p.detach().flatten() for p in model.head.parameters()])
    return dense, every, table.weight.detach(), model


@pytest.mark.parametrize(("workers", "servers", "tol"), [(1, 1, 1e-6), (3, 2, 1e-5)])
def test_sync_training_with_a_dynamic_table_equals_one_process(workers, servers, tol):
    steps = 10
    cluster = Cluster(servers=servers, workers=workers)
    try:
        job_id = cluster.submit(spec(workers, servers, steps))
        job = cluster.wait(job_id)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job
        dense_ref, ids_ref, rows_ref, model_ref = reference(steps)
        exported = cluster.client.export(job_id)[0]
        ids, rows = exported["bag.ids"], exported["bag.rows"]
        # Every id the steps touched has a row; an id only evaluation read keeps its start.
        at = torch.searchsorted(ids, ids_ref)
        assert torch.equal(ids[at], ids_ref)
        table_diff = float((rows[at] - rows_ref).abs().max())
        dense_diff = float((cluster.weights(job_id) - dense_ref).abs().max())
        print(f"{workers} workers, {servers} servers: dense {dense_diff:.3g}, table {table_diff:.3g}")
        assert dense_diff <= tol and table_diff <= tol
        others = torch.ones(ids.numel(), dtype=torch.bool)
        others[at] = False
        assert torch.equal(rows[others], init_rows(SEED, "bag", ids[others], DIM, INIT))
        assert not torch.equal(rows_ref, init_rows(SEED, "bag", ids_ref, DIM, INIT))  # it moved
        # The export loads back into the model: the same outputs as the reference's.
        data = load_dataset(DATA, {}, SEED)
        loaded = dyn_model(data.info)
        load_exported(loaded, exported)
        x = data.train_x[:64]
        table = torch.nn.EmbeddingBag.from_pretrained(rows_ref, mode="sum")
        want = model_ref.head(table(torch.searchsorted(ids_ref, ids_of(x))))
        with torch.no_grad():
            assert float((loaded(x) - want).abs().max()) <= 10 * tol
    finally:
        cluster.close()


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_training_with_admission_drops_unadmitted_ids_and_learns(mode):
    """async and ssp, 2 workers, 2 servers, admit_after 2: cold ids (seen once) never get a
    row, read as zeros and drop their gradient; hot ids are admitted and the loss falls."""
    steps = 80
    cluster = Cluster(servers=2, workers=2)
    try:
        job_id = cluster.submit(spec(2, 2, steps, mode=mode, admit_after=2,
                                     sketch_width=1 << 16))
        job = cluster.wait(job_id)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job
        losses = [p.loss for p in sorted(job.losses, key=lambda p: p.step)]
        assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), losses
        stats = [s.rows.stats("bag") for server in cluster.servers
                 for s in server.shards.shards(job_id)]
        assert len(stats) == 2
        assert all(s.unadmitted_reads > 100 and s.dropped_rows > 100 for s in stats)
        # Hot ids (60 of them, with 2 per sighting) are held; the cold ones almost never are.
        assert all(10 < s.rows < 200 for s in stats), stats
    finally:
        cluster.close()


# -- refusals over the wire -------------------------------------------------------------------

N = 8


def dynamic_config(**dynamic) -> ps_pb2.ShardConfig:
    """Shard 0 of 2 of an async job with a fixed table "t" [10, 4] and a dynamic one "d"."""
    common = dict(dim=DIM, num_shards=2, optimizer="lazy_adam", lr=0.01, beta1=0.9,
                  beta2=0.999, eps=1e-8)
    return ps_pb2.ShardConfig(
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8),
        mode=common_pb2.CONSISTENCY_ASYNC, workers=["w0"], epoch=1, layout_fingerprint="test",
        tables=[ps_pb2.TableSpec(name="t", num_embeddings=10, **common),
                ps_pb2.TableSpec(name="d", num_embeddings=0, seed=1, **common, **dynamic)])


def serve(**dynamic):
    """One server holding both shards of job "dj" (dynamic_config(**dynamic)), and a
    RowClient to it."""
    server = ParameterServerDaemon(coordinator=None).start()
    shard_map = common_pb2.ShardMap(version=1, shards=[
        common_pb2.ShardRange(index=i, server_id="s0", address=server.address, offset=i * N // 2,
                              length=N // 2) for i in range(2)])
    with PSClient("dj", shard_map, data_plane=False) as ps:
        ps.init(torch.zeros(N), dynamic_config(**dynamic))
    client = RowClient("dj", shard_map, worker_id="w0", incarnation=0)
    yield server, client
    client.close()
    server.stop(0)


@pytest.fixture
def dynamic_server():
    yield from serve()


def refused(call) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return error.value.details()


def test_hostile_dynamic_row_calls_are_refused_and_change_nothing(dynamic_server):
    server, client = dynamic_server
    ids = torch.arange(-40, 40)
    other = int(ids[dynamic_server_of("d", ids, 2) == 1][0])  # held by shard 1
    mine = ids[dynamic_server_of("d", ids, 2) == 0][:3]
    push = functools.partial(client.push_rows, "d", 0, step=0, batch_size=1)
    assert f"table 'd': id {other} is not on shard 0" in refused(
        lambda: push(torch.tensor([other]), torch.ones(1, DIM)))
    assert f"id {other}" in refused(lambda: client.pull_rows("d", 0, torch.tensor([other]), DIM))
    assert "fp32 [n, 4]" in refused(lambda: push(mine, torch.ones(3, DIM + 1)))
    assert "is dynamic" in refused(lambda: client.init_rows("d", 0, torch.zeros(0, DIM)))
    assert "'t' is fixed" in refused(lambda: client.export_rows("t", 0, DIM, None, 10))
    assert "max_rows must be >= 1" in refused(lambda: client.export_rows("d", 0, DIM, None, 0))
    assert "unknown table 'nope'" in refused(lambda: client.export_rows("nope", 0, DIM, None, 5))
    stats = server.shards.get("dj", 0).rows.stats("d")
    assert (stats.rows, stats.steps, stats.admissions) == (0, 0, 0)
    # Well formed, the same calls work: a pull creates the rows, a push applies.
    _, rows = client.pull_rows("d", 0, mine, DIM)
    assert torch.equal(rows, init_rows(1, "d", mine, DIM, RowInit()))
    assert push(mine, torch.ones(3, DIM)).status == ps_pb2.PUSH_STATUS_APPLIED
    reply, got_ids, got_rows = client.export_rows("d", 0, DIM, None, 10)
    assert reply.ready and not reply.more and torch.equal(got_ids, mine)
    assert torch.allclose(got_rows, rows - 0.01, atol=1e-6)


@pytest.mark.parametrize(("dynamic", "message"), [
    ({"max_bytes": 16}, "table 'd': max_bytes 16 holds no row"),
    ({"init": "gauss"}, "table 'd': row init must be normal, uniform or zeros"),
    ({"sketch_width": 1 << 30}, "table 'd': sketch_width must be <="),
    ({"admit_after": 2, "sketch_depth": 9}, "table 'd': sketch depth must be in [1, 8]"),
])
def test_a_bad_dynamic_table_spec_is_refused_and_no_shard_is_made(dynamic_server, dynamic, message):
    server, client = dynamic_server
    with PSClient("dj2", client.shard_map, data_plane=False) as ps:
        assert message in refused(lambda: ps.init(torch.zeros(N), dynamic_config(**dynamic)))
    assert server.shards.shards("dj2") == []


def test_a_per_table_entry_for_a_table_the_model_lacks_fails_the_job_at_set_up():
    cluster = Cluster(servers=1, workers=1)
    try:
        job = cluster.wait(cluster.submit(spec(1, 1, 5, per_table={"nope": {"max_rows": 5}})))
        assert job.state == common_pb2.JOB_STATE_FAILED, job
        assert "tables.per_table.nope: the model has no table of that name" in job.reason
    finally:
        cluster.close()


# -- what counts as a sighting ----------------------------------------------------------------

@pytest.fixture
def admitting_server():
    """The `dynamic_server` shards with admit_after 3 on the dynamic table "d"."""
    yield from serve(admit_after=3, sketch_width=1 << 12)


def admissions(server: ParameterServerDaemon) -> int:
    return sum(server.shards.get("dj", i).rows.stats("d").admissions for i in range(2))


def test_a_pull_with_no_count_is_no_sighting(admitting_server):
    server, client = admitting_server
    ids = torch.arange(-40, 40)
    mine = ids[dynamic_server_of("d", ids, 2) == 0][:5]
    for _ in range(4):  # never counted: never admitted, however often read
        _, rows = client.pull_rows("d", 0, mine, DIM, count=False)
        assert torch.equal(rows, torch.zeros(5, DIM))
    for _ in range(2):  # two sightings
        _, rows = client.pull_rows("d", 0, mine, DIM)
        assert torch.equal(rows, torch.zeros(5, DIM))
    assert admissions(server) == 0
    _, rows = client.pull_rows("d", 0, mine, DIM)  # the third: admitted, rows start
    assert torch.equal(rows, init_rows(1, "d", mine, DIM, RowInit()))
    assert admissions(server) == 5


class Direct:
    """TableSync's caller without retries (JobShards.call is the worker's)."""

    def call(self, what, fn):
        return fn()


class LostReply:
    """A caller whose first try's reply is lost after the server answered: it tries again,
    as JobShards.call does after a transient error."""

    def call(self, what, fn):
        fn()
        return fn()


def test_the_worker_counts_a_steps_training_pull_once(admitting_server):
    """Evaluation (no gradient), a step computed again after a rewind, and a retried pull are
    no sightings; each step's first training pull is one."""
    server, client = admitting_server
    model = torch.nn.ModuleDict({"d": Embedding(None, DIM)})
    tables = TableSync(model, spec_lib.parse_spec(yaml.safe_dump(spec(1, 2, 10))))
    ids = torch.sort(torch.arange(-40, 40)).values
    tables.bind(client, Direct())
    with torch.no_grad():
        for _ in range(3):
            tables.fetch("d", ids)
    tables.start_step(0)
    tables.fetch("d", ids)  # sighting 1
    tables.start_step(0)  # the same step again (a rewind)
    tables.fetch("d", ids)
    tables.bind(client, LostReply())
    tables.start_step(1)
    tables.fetch("d", ids)  # sighting 2, tried twice
    assert admissions(server) == 0
    tables.bind(client, Direct())
    tables.start_step(2)
    rows = tables.fetch("d", ids)  # sighting 3: admitted
    assert admissions(server) == ids.numel()
    assert torch.equal(rows, init_rows(1, "d", ids, DIM, RowInit()))


def test_evaluation_does_not_change_what_training_admits():
    """sync, admit_after 4: evaluating every 2 steps (rank 0 reads the test split's ids, the
    same hot ids as training's) trains the same weights, bitwise, as evaluating never."""
    cluster = Cluster(servers=2, workers=1)
    try:
        results = []
        for eval_every in (2, 1000):
            raw = spec(1, 2, 12, admit_after=4, sketch_width=1 << 16)
            raw["stop"]["eval_every"] = eval_every
            job_id = cluster.submit(raw)
            job = cluster.wait(job_id)
            assert job.state == common_pb2.JOB_STATE_COMPLETED, job
            exported = cluster.client.export(job_id)[0]
            stats = [s.rows.stats("bag") for server in cluster.servers
                     for s in server.shards.shards(job_id)]
            results.append((exported, sum(s.admissions for s in stats)))
        (evaluated, admitted), (quiet, admitted_quiet) = results
        assert admitted == admitted_quiet > 0
        assert evaluated.keys() == quiet.keys()
        for key in quiet:
            assert torch.equal(evaluated[key], quiet[key]), key
    finally:
        cluster.close()
