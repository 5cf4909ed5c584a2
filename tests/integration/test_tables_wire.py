"""Embedding tables served by real parameter servers (docs/tables.md), over the data plane
and over the gRPC fallback (`--data-port -1`) alike: sync training of a model with an
Embedding, an EmbeddingBag with offsets and dense layers equals one process with torch's
modules, SparseAdam on the tables and Adam on the dense part; and the row calls refuse bad
input with INVALID_ARGUMENT, changing nothing."""

import functools
import random
import socket

import grpc
import pytest
import torch

from shardps.proto import common_pb2, dataplane, ps_pb2, rowcodec
from shardps.proto.tables import FixedLayout, assemble_fixed
from shardps.psclient import rows as psrows
from shardps.psclient.client import PSClient
from shardps.psclient.rows import RowClient
from shardps.runtime import rpc
from shardps.server.ps.daemon import ParameterServerDaemon
from shardps.worker.datasets import load_dataset
from tests.cluster import Cluster
from tests.integration.tablemodel import table_model, train_in_one_process

pytestmark = pytest.mark.timeout(180)

STEPS, BATCH, LR, SEED = 10, 32, 0.01, 3
MODEL = "tests.integration.tablemodel:table_model"
TABLES = ("emb", "bag")
# The servers' data port: 0 gives each a data plane (the row calls' default path), -1 none
# (the RPCs).
PATHS = pytest.mark.parametrize("data_port", [0, -1], ids=["plane", "grpc"])


def spec(workers: int, servers: int, mode: str = "sync", steps: int = STEPS,
         table_opt: str = "lazy_adam") -> dict:
    # Evaluations mid-way (rank 0 fetches rows without gradients) must not disturb training.
    return {"seed": SEED, "model": {"name": MODEL},
            "data": {"dataset": "digits", "batch_size": BATCH, "shuffle": False},
            "optimizer": {"lr": LR}, "consistency": {"mode": mode},
            "cluster": {"servers": servers, "workers": workers},
            "stop": {"max_steps": steps, "eval_every": 4},
            "tables": {"optimizer": table_opt}}


class RowwiseAdagrad:
    """The row-wise Adagrad reference (FBGEMM's exact row-wise Adagrad) on torch's sparse
    gradients: per touched row, acc += mean(g^2); row -= lr * g / (sqrt(acc) + eps)."""

    def __init__(self, tables: list[torch.nn.Parameter], lr: float, eps: float = 1e-8):
        self.tables, self.lr, self.eps = tables, lr, eps
        self.acc = [torch.zeros(t.shape[0]) for t in tables]

    def zero_grad(self) -> None:
        for t in self.tables:
            t.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for table, acc in zip(self.tables, self.acc, strict=True):
            grad = table.grad.coalesce()
            rows, g = grad.indices()[0], grad.values()
            total = acc.index_select(0, rows) + g.pow(2).mean(1)
            acc.index_copy_(0, rows, total)
            scale = self.lr / (total.sqrt() + self.eps)
            table.index_copy_(0, rows, table.index_select(0, rows) - scale[:, None] * g)


def reference(table_opt: str = "lazy_adam") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process: torch's modules (sparse=True), SparseAdam (or the row-wise Adagrad
    reference) on the tables, fused Adam (as the servers run it) on the dense part. Returns
    the dense flat vector and the tables."""
    data = load_dataset("digits", {}, SEED)
    torch.manual_seed(SEED)
    model = table_model(data.info, sparse=True)
    table_step = (functools.partial(torch.optim.SparseAdam, lr=LR) if table_opt == "lazy_adam"
                  else functools.partial(RowwiseAdagrad, lr=LR))
    dense = train_in_one_process(model, data, table_step, steps=STEPS, batch=BATCH, lr=LR,
                                 seed=SEED)
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
        out[name] = assemble_fixed(layout, {s.index: s.rows.held(name) for s in shards})
    return out


@PATHS
@pytest.mark.parametrize(("workers", "servers", "tol", "table_opt"), [
    (1, 1, 1e-6, "lazy_adam"), (3, 2, 1e-5, "lazy_adam"), (1, 1, 1e-6, "adagrad"),
    (3, 2, 1e-5, "adagrad")])
def test_sync_tables_match_the_single_process_reference(workers, servers, tol, table_opt,
                                                       data_port, tmp_path):
    cluster = Cluster(servers=servers, workers=workers, data_port=data_port)
    try:
        job_id = cluster.submit(spec(workers, servers, table_opt=table_opt))
        job = cluster.wait(job_id)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job
        # Every worker pushed every step to every shard.
        assert [i.pushes_applied for i in cluster.shard_infos(job_id)] == [STEPS * workers] * servers
        flat, tables = reference(table_opt)
        served = served_tables(cluster, job_id)
        dense = cluster.weights(job_id)
        dense_diff = float((dense - flat).abs().max())
        table_diff = {n: float((served[n] - tables[n]).abs().max()) for n in TABLES}
        print(f"{table_opt}, {workers} workers, {servers} servers: dense {dense_diff:.3g}, tables {table_diff}")
        assert dense.numel() == flat.numel()  # the tables stayed out of the flat layout
        assert dense_diff <= tol and max(table_diff.values()) <= tol
        # The tables moved: a frozen table would equal its initial rows.
        torch.manual_seed(SEED)
        initial = table_model(load_dataset("digits", {}, SEED).info)
        assert not torch.equal(served["emb"], initial.emb.weight.detach())
        # Export writes the tables as the torch modules' weights: they load as they are.
        path = tmp_path / "model.pt"
        cluster.client.export_to(job_id, path)
        initial.load_state_dict(torch.load(path, weights_only=True), strict=True)
        for name in TABLES:
            assert torch.equal(getattr(initial, name).weight.detach(), served[name])
        loaded = [p.detach().flatten() for n, p in initial.named_parameters()
                  if n.split(".")[0] not in TABLES]
        assert torch.equal(torch.cat(loaded), dense)
    finally:
        cluster.close()


@PATHS
@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_tables_train_in_async_and_ssp(mode, data_port):
    """Pushes apply on arrival: the job completes with a falling loss and moved tables."""
    cluster = Cluster(servers=2, workers=2, data_port=data_port)
    try:
        job_id = cluster.submit(spec(2, 2, mode, steps=40))
        job = cluster.wait(job_id)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job
        losses = [p.loss for p in sorted(job.losses, key=lambda p: p.step)]
        assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses
        served = served_tables(cluster, job_id)
        torch.manual_seed(SEED)
        initial = table_model(load_dataset("digits", {}, SEED).info)
        assert not torch.equal(served["bag"], initial.bag.weight.detach())
    finally:
        cluster.close()


CLIP = 0.5  # below the step's gradient norm in every step of this job (checked below)


def clipped_reference(clip_tables: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """`reference` with the whole gradient clipped to norm CLIP each step, as
    torch.nn.utils.clip_grad_norm_ would over all the parameters; torch refuses sparse
    gradients there, so the norm is computed by hand the same way: the L2 norm of the
    parameters' norms, a sparse gradient's norm over its coalesced values. clip_tables False
    clips the dense part only (what the test must tell apart). Also returns how many steps
    were clipped."""
    data = load_dataset("digits", {}, SEED)
    torch.manual_seed(SEED)
    model = table_model(data.info, sparse=True)
    clipped = 0

    def clip(tables: list[torch.Tensor], dense: list[torch.Tensor]) -> None:
        nonlocal clipped
        for p in tables:
            p.grad = p.grad.coalesce()
        parts = [torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in dense]))]
        parts += [torch.linalg.vector_norm(p.grad.values()) for p in tables]
        norm = float(torch.linalg.vector_norm(torch.stack(parts if clip_tables else parts[:1])))
        coef = CLIP / (norm + 1e-6)
        if coef < 1.0:
            clipped += 1
            for p in dense + (tables if clip_tables else []):
                p.grad.mul_(coef)

    dense = train_in_one_process(model, data, functools.partial(torch.optim.SparseAdam, lr=LR),
                                 steps=STEPS, batch=BATCH, lr=LR, seed=SEED, after_backward=clip)
    flat = torch.cat([p.detach().flatten() for p in dense])
    return flat, {name: getattr(model, name).weight.detach() for name in TABLES}, clipped


@pytest.mark.parametrize("servers", [1, 2])
def test_gradient_clipping_covers_the_tables_rows(servers):
    """optimizer.clip_grad_norm with tables: one norm over the dense gradient and the row
    gradients, both scaled by the same factor; sync training equals one process that clips
    all its parameters. (One worker: with several, each clips its own slice's gradient, as
    the dense path always has.)"""
    cluster = Cluster(servers=servers, workers=1)
    try:
        raw = spec(1, servers)
        raw["optimizer"]["clip_grad_norm"] = CLIP
        job_id = cluster.submit(raw)
        job = cluster.wait(job_id)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job
        flat, tables, clipped = clipped_reference()
        assert clipped == STEPS  # every step was clipped: the test exercises the clip
        served, dense = served_tables(cluster, job_id), cluster.weights(job_id)
        diffs = [float((dense - flat).abs().max())]
        diffs += [float((served[n] - tables[n]).abs().max()) for n in TABLES]
        assert max(diffs) <= 1e-5, diffs
        # Clipping the dense part alone gives other weights: the rows' norm counted.
        flat_dense_only, tables_dense_only, _ = clipped_reference(clip_tables=False)
        apart = max(float((dense - flat_dense_only).abs().max()),
                    *(float((served[n] - tables_dense_only[n]).abs().max()) for n in TABLES))
        assert apart > 1e-4, apart
    finally:
        cluster.close()


# -- refusals over the wire -------------------------------------------------------------------

DIM, ROWS = 4, 50
ASYNC = common_pb2.CONSISTENCY_ASYNC


def table_shard_config(optimizer: str = "lazy_adam") -> ps_pb2.ShardConfig:
    """An async shard of 8 dense elements and one fixed table "t" [50, 4] on one shard."""
    return ps_pb2.ShardConfig(
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8),
        mode=ASYNC, workers=["w0"], epoch=1, layout_fingerprint="test",
        tables=[ps_pb2.TableSpec(name="t", dim=DIM, num_embeddings=ROWS, num_shards=1,
                                 optimizer=optimizer, lr=0.01, beta1=0.9, beta2=0.999,
                                 eps=1e-8)])


@pytest.fixture(params=[0, -1], ids=["plane", "grpc"])
def table_server(request):
    """A standalone server holding job "tj" shard 0 (async) with one fixed table "t"
    [50, 4] seeded with known rows, with a data plane (the client's row calls take it) or
    without (they take the RPCs); yields (server, RowClient, seeded rows)."""
    server = ParameterServerDaemon(coordinator=None, metrics_port=0,
                                   data_port=request.param).start()
    shard_map = common_pb2.ShardMap(version=1, shards=[common_pb2.ShardRange(
        index=0, server_id="s0", address=server.address, offset=0, length=8)])
    config = table_shard_config()
    rows = torch.arange(ROWS * DIM, dtype=torch.float32).view(ROWS, DIM) / 100
    with PSClient("tj", shard_map, data_plane=False) as ps:
        ps.init(torch.zeros(8), config)
    client = RowClient("tj", shard_map, worker_id="w0", incarnation=0)
    client.init_rows("t", 0, rows[FixedLayout("t", ROWS, 1).ids_on(0)])
    # The calls took the path the server offers: an idle data-plane connection, or none.
    assert bool(client._servers[0].plane._idle) == (request.param == 0)
    yield server, client, rows
    client.close()
    server.stop(0)


def push(client: RowClient, **fields) -> ps_pb2.PushRowsResponse:
    """A PushRows as a hostile client may send it: `fields` replace a valid request's."""
    ids = torch.tensor([1, 5, 7])
    request = ps_pb2.PushRowsRequest(
        job_id="tj", shard_index=0, table="t", worker_id="w0", step=0, batch_size=1,
        ids=rowcodec.encode_ids(ids), rows=rowcodec.encode_rows(torch.ones(3, DIM)),
        dtype=common_pb2.DTYPE_FLOAT32)
    for key, value in fields.items():
        setattr(request, key, value)
    return client._servers[0].start("PushRows", request, ps_pb2.PushRowsResponse, 10).result()


HOSTILE = {
    "wrong dim": ({"rows": rowcodec.encode_rows(torch.ones(3, DIM + 1))}, "fp32 [n, 4]"),
    "row count": ({"rows": rowcodec.encode_rows(torch.ones(2, DIM))}, "fp32[3, 4]"),
    "NaN rows": ({"rows": rowcodec.encode_rows(torch.full((3, DIM), float("nan")))},
                 "non-finite"),
    "inf rows": ({"rows": rowcodec.encode_rows(torch.full((3, DIM), float("inf")))},
                 "non-finite"),
    "rows dtype": ({"dtype": common_pb2.DTYPE_BFLOAT16}, "DTYPE_FLOAT32"),
    "int32 ids": ({"ids": torch.tensor([1, 5, 7], dtype=torch.int32).numpy().tobytes()},
                  "int64"),
    "unsorted ids": ({"ids": rowcodec.encode_ids(torch.tensor([5, 1, 7]))}, "strictly increasing"),
    "duplicate ids": ({"ids": rowcodec.encode_ids(torch.tensor([1, 5, 5]))},
                      "strictly increasing"),
    "id out of range": ({"ids": rowcodec.encode_ids(torch.tensor([1, 5, 50]))},
                        "id 50 is out of range [0, 50)"),
    "negative id": ({"ids": rowcodec.encode_ids(torch.tensor([-3, 1, 5]))}, "id -3"),
    "unknown table": ({"table": "nope"}, "unknown table 'nope'"),
    "unknown worker": ({"worker_id": "w9"}, "not a live worker"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_push_rows_is_refused_and_changes_nothing(table_server, case):
    server, client, rows = table_server
    fields, message = HOSTILE[case]
    with pytest.raises(grpc.RpcError) as refused:
        push(client, **fields)
    code = (grpc.StatusCode.FAILED_PRECONDITION if case == "unknown worker"
            else grpc.StatusCode.INVALID_ARGUMENT)
    assert refused.value.code() == code and message in refused.value.details()
    if case != "unknown worker":
        table = fields.get("table", "t")
        assert f"table {table!r}" in refused.value.details()
    shard = server.shards.get("tj", 0)
    ids = torch.arange(ROWS)
    reply, now = client.pull_rows("t", 0, ids, DIM, timeout_s=5)
    assert reply.ready and torch.equal(now, rows) and shard.rows.stats("t").steps == 0
    # The same push, well formed, applies at once (async): the test can see a change.
    assert push(client).status == ps_pb2.PUSH_STATUS_APPLIED
    _, after = client.pull_rows("t", 0, ids, DIM, timeout_s=5)
    changed = (after != rows).any(1).nonzero().flatten().tolist()
    assert changed == [1, 5, 7] and shard.rows.stats("t").steps == 1


@pytest.mark.parametrize(("ids", "table", "message"), [
    (torch.tensor([3, 2]), "t", "strictly increasing"),
    (torch.tensor([0, 60]), "t", "id 60 is out of range"),
    (torch.tensor([1]), "nope", "unknown table 'nope'"),
    (torch.tensor([1]), "../" * 1000, "table"),  # never echoed unbounded
])
def test_hostile_pull_rows_is_refused(table_server, ids, table, message):
    _, client, _ = table_server
    with pytest.raises(grpc.RpcError) as refused:
        client.pull_rows(table, 0, ids, DIM, timeout_s=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details() and len(refused.value.details()) < 300


def test_bad_table_config_and_seed_rows_are_refused(table_server):
    server, client, rows = table_server
    for first, count in ((0, 51), (40, 11), (-1, 2)):  # the shard holds 50 rows
        with pytest.raises(grpc.RpcError) as refused:
            client._servers[0].start("InitRows", ps_pb2.InitRowsRequest(
                job_id="tj", shard_index=0, table="t", first_row=first,
                rows=rowcodec.encode_rows(torch.zeros(count, DIM))), ps_pb2.InitRowsResponse,
                10).result()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"holds 50 rows, got rows [{first}, {first + count})" in refused.value.details()
    _, now = client.pull_rows("t", 0, torch.arange(ROWS), DIM, timeout_s=5)
    assert torch.equal(now, rows)
    shard_map = client.shard_map
    bad = table_shard_config(optimizer="sgd")
    with PSClient("tj2", shard_map, data_plane=False) as ps, pytest.raises(grpc.RpcError) as refused:
        ps.init(torch.zeros(8), bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "table 't': optimizer must be one of" in refused.value.details()
    assert server.shards.shards("tj2") == []


def test_init_rows_in_several_calls_sets_every_row(table_server, monkeypatch):
    """A shard's rows larger than INIT_BYTES go in calls of INIT_BYTES, each at its slot."""
    server, client, _ = table_server
    monkeypatch.setattr(psrows, "INIT_BYTES", 3 * DIM * 4)  # 3 rows per call: 17 calls
    new = torch.randn(ROWS, DIM)
    client.init_rows("t", 0, new[FixedLayout("t", ROWS, 1).ids_on(0)])
    _, now = client.pull_rows("t", 0, torch.arange(ROWS), DIM, timeout_s=5)
    assert torch.equal(now, new)


# -- hostile frames on the data plane ---------------------------------------------------------

def plane_socket(server) -> socket.socket:
    """A raw connection to the server's data plane, past the hello."""
    sock = socket.create_connection(("127.0.0.1", server.data_port), timeout=10)
    sock.sendall(dataplane.MAGIC + dataplane.TOKEN_LEN.pack(0))
    assert dataplane.recv_frame(sock) == (0, b"")
    return sock


def pull_request(ids: torch.Tensor) -> bytes:
    return ps_pb2.PullRowsRequest(job_id="tj", shard_index=0, table="t", timeout_ms=5000,
                                  ids=rowcodec.encode_ids(ids)).SerializeToString()


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def unchanged(server, client, rows) -> bool:
    _, now = client.pull_rows("t", 0, torch.arange(ROWS), DIM, timeout_s=5)
    return torch.equal(now, rows) and server.shards.get("tj", 0).rows.stats("t").steps == 0


@pytest.mark.parametrize("table_server", [0], indirect=True, ids=["plane"])
def test_hostile_row_frames_are_refused_and_change_nothing(table_server):
    server, client, rows = table_server
    # A body that does not parse: refused, and the connection stays in step.
    with plane_socket(server) as sock:
        sock.sendall(dataplane.frame(dataplane.PUSH_ROWS, b"\xff\xff\xff"))
        code, message = dataplane.recv_frame(sock)
        assert (dataplane.status_code(code), message) == (
            grpc.StatusCode.INVALID_ARGUMENT, b"PushRows request does not parse")
        sock.sendall(dataplane.frame(dataplane.PULL_ROWS, pull_request(torch.tensor([2, 9]))))
        code, body = dataplane.recv_frame(sock, dataplane.MAX_ROWS_BODY_BYTES)
        reply = ps_pb2.PullRowsResponse.FromString(body)
        assert code == 0 and torch.equal(rowcodec.decode_rows("t", reply.rows, DIM), rows[[2, 9]])
    # A body over the limit: refused as gRPC refuses a message over its own, then closed.
    with plane_socket(server) as sock:
        sock.sendall(dataplane.FRAME.pack(dataplane.PUSH_ROWS, dataplane.MAX_ROWS_BODY_BYTES + 1))
        code, message = dataplane.recv_frame(sock)
        assert dataplane.status_code(code) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert b"at most" in message and closed(sock)
    # An unknown kind (6-9 are the same-host path's): refused and closed.
    with plane_socket(server) as sock:
        sock.sendall(dataplane.frame(99, b""))
        code, message = dataplane.recv_frame(sock)
        assert (dataplane.status_code(code), message) == (
            grpc.StatusCode.INVALID_ARGUMENT, b"unknown request kind 99")
        assert closed(sock)
    # A push cut short (the client goes away mid-body): nothing applied.
    push = ps_pb2.PushRowsRequest(
        job_id="tj", shard_index=0, table="t", worker_id="w0", step=0, batch_size=1,
        ids=rowcodec.encode_ids(torch.tensor([1, 5])), rows=rowcodec.encode_rows(torch.ones(2, DIM)),
        dtype=common_pb2.DTYPE_FLOAT32).SerializeToString()
    with plane_socket(server) as sock:
        sock.sendall(dataplane.frame(dataplane.PUSH_ROWS, push)[:-8])
    # A row frame before the hello is no data-plane client at all.
    with socket.create_connection(("127.0.0.1", server.data_port), timeout=10) as sock:
        sock.sendall(dataplane.frame(dataplane.PULL_ROWS, pull_request(torch.tensor([1]))))
        code, message = dataplane.recv_frame(sock)
        assert dataplane.status_code(code) == grpc.StatusCode.INVALID_ARGUMENT
        assert message == b"not a shardps data-plane client" and closed(sock)
    assert unchanged(server, client, rows)
    # The same push, whole, applies (the test can see a change).
    with plane_socket(server) as sock:
        sock.sendall(dataplane.frame(dataplane.PUSH_ROWS, push))
        code, body = dataplane.recv_frame(sock)
        assert ps_pb2.PushRowsResponse.FromString(body).status == ps_pb2.PUSH_STATUS_APPLIED
    assert not unchanged(server, client, rows)


@pytest.mark.parametrize("table_server", [0], indirect=True, ids=["plane"])
def test_random_row_frames_get_a_status_each_and_leave_the_rows_as_they_were(table_server):
    """Fuzzed like the dense path: 300 row frames, each one field or the whole body random, on
    one connection: every one is answered with a handled status (the connection stays in
    step), and the rows are what they were."""
    server, client, rows = table_server
    rng = random.Random(12)
    kinds = {dataplane.INIT_ROWS: ps_pb2.InitRowsRequest, dataplane.PULL_ROWS: ps_pb2.PullRowsRequest,
             dataplane.PUSH_ROWS: ps_pb2.PushRowsRequest}
    outcomes: dict[grpc.StatusCode, int] = {}
    with plane_socket(server) as sock:
        for _ in range(300):
            kind = rng.choice(list(kinds))
            message = kinds[kind](job_id=rng.choice(["tj", "tj", "other"]), table=rng.choice(["t", "nope"]),
                                  shard_index=rng.choice([0, 0, 1]))
            if kind != dataplane.INIT_ROWS:
                message.ids = rng.randbytes(rng.choice([0, 7, 8, 16, 24]))
            if kind != dataplane.PULL_ROWS:
                message.rows = rng.randbytes(rng.choice([0, 5, 16, 48]))
            if isinstance(message, ps_pb2.InitRowsRequest):  # never a slot of the shard's rows
                message.first_row = rng.choice([-2, ROWS, ROWS + 1, 2**40])
            if isinstance(message, ps_pb2.PushRowsRequest):
                message.worker_id, message.step = rng.choice(["w0", "w9", ""]), rng.randint(-1, 3)
                message.dtype = rng.choice([common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16, 99])
            body = message.SerializeToString()
            if rng.random() < 0.2:
                body = rng.randbytes(len(body))
            sock.sendall(dataplane.frame(kind, body))
            code, _ = dataplane.recv_frame(sock, dataplane.MAX_ROWS_BODY_BYTES)
            status = dataplane.status_code(code)
            outcomes[status] = outcomes.get(status, 0) + 1
    handled = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.FAILED_PRECONDITION}
    assert set(outcomes) <= handled and outcomes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100, outcomes
    _, now = client.pull_rows("t", 0, torch.arange(ROWS), DIM, timeout_s=5)
    assert torch.equal(now, rows)


def test_row_calls_on_the_data_plane_take_the_token_and_refuse_a_wrong_one():
    """A server with a token: the RowClient of a process that has it reads and writes rows over
    the data plane; a connection with another token is refused at hello (UNAUTHENTICATED),
    before its row frame is read, and nothing changes."""
    rpc.configure(rpc.Security(token="s3cret"))
    server = client = None
    try:
        server = ParameterServerDaemon(coordinator=None, metrics_port=0).start()
        shard_map = common_pb2.ShardMap(version=1, shards=[common_pb2.ShardRange(
            index=0, server_id="s0", address=server.address, offset=0, length=8)])
        with PSClient("tj", shard_map, data_plane=False) as ps:
            ps.init(torch.zeros(8), table_shard_config())
        client = RowClient("tj", shard_map, worker_id="w0")
        rows = torch.randn(ROWS, DIM)
        client.init_rows("t", 0, rows[FixedLayout("t", ROWS, 1).ids_on(0)])
        _, got = client.pull_rows("t", 0, torch.arange(ROWS), DIM, timeout_s=5)
        assert torch.equal(got, rows) and client._servers[0].plane._idle  # over the data plane
        push = ps_pb2.PushRowsRequest(
            job_id="tj", shard_index=0, table="t", worker_id="w0", step=0, batch_size=1,
            ids=rowcodec.encode_ids(torch.tensor([1])), rows=rowcodec.encode_rows(torch.ones(1, DIM)),
            dtype=common_pb2.DTYPE_FLOAT32).SerializeToString()
        with socket.create_connection(("127.0.0.1", server.data_port), timeout=10) as sock:
            sock.sendall(dataplane.MAGIC + dataplane.TOKEN_LEN.pack(5) + b"wrong"
                         + dataplane.frame(dataplane.PUSH_ROWS, push))
            code, _ = dataplane.recv_frame(sock)
            assert dataplane.status_code(code) == grpc.StatusCode.UNAUTHENTICATED and closed(sock)
        _, now = client.pull_rows("t", 0, torch.arange(ROWS), DIM, timeout_s=5)
        assert torch.equal(now, rows) and server.shards.get("tj", 0).rows.stats("t").steps == 0
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop(0)
        rpc.configure(rpc.Security())
