"""Server-initialised fixed tables (docs/tables.md, "Tables too big for a worker"): a module
built with `init=` holds no weight, the servers fill their rows from init_rows of (seed, table,
id), `materialize` builds the same rows in one process, and training through the servers'
shards equals torch on the materialised module."""


import pytest
import torch
from torch import nn

from shardps.proto import ps_pb2
from shardps.proto import tables as tables_lib
from shardps.proto.tables import FixedLayout, RowInit
from shardps.server.ps.errors import InvalidConfigError
from shardps.server.ps.table_config import TableConfig
from shardps.server.ps.table_optim import LazyAdam
from shardps.server.ps.table_shard import TableShard
from shardps.server.ps.tables import table_config
from shardps.worker import embedding
from shardps.worker.embedding import Embedding, EmbeddingBag
from shardps.worker.tableinit import materialize
from shardps.worker.tablesync import server_init_of

UNIFORM = RowInit("uniform", -0.5, 0.5)


@pytest.mark.parametrize("servers", [1, 3])
def test_server_rows_are_the_id_order_rows_dealt_by_the_layout(servers):
    n, dim, seed = 1000, 5, 11
    whole = tables_lib.init_fixed_rows(seed, "t", n, dim, RowInit(), padding_idx=7, block_rows=64)
    layout = FixedLayout("t", n, servers)
    parts = {s: tables_lib.init_fixed_rows(seed, "t", n, dim, RowInit(), padding_idx=7,
                                           layout=layout, server=s, block_rows=37)
             for s in range(servers)}
    assert torch.equal(tables_lib.assemble_fixed(layout, parts), whole)
    assert whole[7].eq(0).all() and whole[6].ne(0).all()
    ids = torch.tensor([0, 6, 999])
    assert torch.equal(whole[ids], tables_lib.init_rows(seed, "t", ids, dim, RowInit()))
    # Another seed or table name: other rows.
    assert not torch.equal(whole, tables_lib.init_fixed_rows(seed + 1, "t", n, dim, RowInit()))
    assert not torch.equal(whole, tables_lib.init_fixed_rows(seed, "u", n, dim, RowInit()))


def test_a_server_initialised_module_builds_no_weight():
    torch.manual_seed(5)
    emb = Embedding(10**12, 16, init=UNIFORM)  # 64 TB if it were built
    bag = EmbeddingBag(10**12, 16, mode="sum", padding_idx=-1, init=RowInit())
    for module in (emb, bag):
        assert module.server_init and module.weight is None and module.init_seed == 5
        assert list(module.parameters()) == [] and module.state_dict() == {}
    assert bag.padding_idx == 10**12 - 1  # torch's rules still apply (negative padding)
    with pytest.raises(RuntimeError, match="materialize"):
        emb(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="not both"):
        Embedding(3, 2, init=RowInit(), _weight=torch.zeros(3, 2))


def test_materialize_builds_the_rows_the_servers_start_from():
    torch.manual_seed(9)
    model = nn.ModuleDict({"a": Embedding(50, 4, padding_idx=3, init=UNIFORM),
                           "b": Embedding(20, 4), "c": EmbeddingBag(30, 2, init=RowInit())})
    assert materialize(model) == ["a", "c"]
    assert materialize(model) == []  # built once
    a = model["a"].weight
    assert isinstance(a, nn.Parameter) and a.shape == (50, 4)
    assert torch.equal(a.detach(), tables_lib.init_fixed_rows(9, "a", 50, 4, UNIFORM, padding_idx=3))
    assert a.detach().abs().max() <= 0.5 and a[3].eq(0).all()
    # What the job's servers hold, from the TableSpec the worker sends.
    spec = ps_pb2.TableSpec(name="a", dim=4, num_embeddings=50, num_shards=2, optimizer="lazy_adam",
                            lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                            server_init=server_init_of(model["a"]))
    parts = {s: TableShard(table_config(spec, s), LazyAdam(lr=0.1)).rows_in_slot_order()
             for s in range(2)}
    assert torch.equal(tables_lib.assemble_fixed(FixedLayout("a", 50, 2), parts), a.detach())
    assert server_init_of(model["b"]) is None


def _spec(**init) -> ps_pb2.TableSpec:
    return ps_pb2.TableSpec(name="huge", dim=4, num_embeddings=10, num_shards=1,
                            optimizer="adagrad", lr=0.1, eps=1e-8,
                            server_init=ps_pb2.ServerInit(**init))


@pytest.mark.parametrize(("init", "message"), [
    ({"kind": "gauss", "b": 1}, "table 'huge': server_init: row init must be normal"),
    ({"kind": "normal", "b": -1}, "table 'huge': server_init: normal row init needs std"),
    ({"kind": "uniform", "a": float("nan")}, "table 'huge': server_init: .*finite"),
    ({"kind": "zeros", "padding_idx": 10}, r"table 'huge': padding_idx 10 is out of range"),
])
def test_a_bad_server_init_is_refused_naming_the_table(init, message):
    with pytest.raises(InvalidConfigError, match=message):
        table_config(_spec(**init), 0)


def test_server_init_is_for_fixed_tables():
    with pytest.raises(ValueError, match="server_init is for fixed tables"):
        TableConfig("d", 4, None, server_init=True)


class Net(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.emb = table(Embedding, 300, 6, padding_idx=0, sparse=True)
        self.bag = table(EmbeddingBag, 400, 6, mode="mean", sparse=True)
        self.head = nn.Linear(12, 1)

    def forward(self, x, bag_ids, offsets):
        return self.head(torch.cat([self.emb(x).mean(1), self.bag(bag_ids, offsets)], 1)).squeeze(1)


def _server_init(cls, n, dim, **kwargs):
    return cls(n, dim, init=UNIFORM if cls is Embedding else RowInit("normal", 0.0, 0.1), **kwargs)


def _batches(steps, batch=16):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 40, (batch, 3), generator=gen)  # padding 0 among them
        bag_ids = torch.randint(0, 400, (batch * 2,), generator=gen)
        offsets = torch.arange(0, batch * 2, 2)
        yield x, bag_ids, offsets, torch.randn(batch, generator=gen)


def test_training_through_server_initialised_shards_equals_torch_on_the_materialised_model():
    steps, servers = 6, 2
    torch.manual_seed(4)
    ref = Net(_server_init)
    materialize(ref)
    opts = [torch.optim.SparseAdam([ref.emb.weight, ref.bag.weight], lr=0.05),
            torch.optim.Adam(ref.head.parameters(), lr=0.01)]
    for x, bag_ids, offsets, y in _batches(steps):
        for opt in opts:
            opt.zero_grad()
        ((ref(x, bag_ids, offsets) - y) ** 2).mean().backward()
        for opt in opts:
            opt.step()

    torch.manual_seed(4)
    model = Net(_server_init)
    shards = {}
    for name, module in embedding.table_modules(model):
        assert module.attach(_Source(shards), name) is None  # nothing for rank 0 to send
        spec = ps_pb2.TableSpec(name=name, dim=6, num_embeddings=module.num_embeddings,
                                num_shards=servers, optimizer="lazy_adam",
                                server_init=server_init_of(module))
        shards[name] = [TableShard(table_config(spec, s), LazyAdam(lr=0.05)) for s in range(servers)]
    dense = torch.optim.Adam(model.parameters(), lr=0.01)
    for x, bag_ids, offsets, y in _batches(steps):
        dense.zero_grad()
        ((model(x, bag_ids, offsets) - y) ** 2).mean().backward()
        dense.step()
        for name, module in embedding.table_modules(model):
            ids, grads = module.take_row_grads()
            where = shards[name][0].layout.place(ids)[0]
            for s, shard in enumerate(shards[name]):
                shard.apply(ids[where == s], grads[where == s])
    for name in ("emb", "bag"):
        layout = shards[name][0].layout
        held = tables_lib.assemble_fixed(layout, {s: sh.rows_in_slot_order()
                                                  for s, sh in enumerate(shards[name])})
        assert torch.equal(held, getattr(ref, name).weight.detach()), name
    assert torch.equal(model.head.weight, ref.head.weight)


class _Source:
    """A row source over the test's table shards (split by the fixed layout)."""

    def __init__(self, shards):
        self.shards = shards

    def fetch(self, table, ids):
        shards = self.shards[table]
        out = torch.empty(ids.numel(), shards[0].dim)
        where = shards[0].layout.place(ids)[0]
        for s, shard in enumerate(shards):
            out[where == s] = shard.lookup(ids[where == s])
        return out




MEASURE = """
import resource, torch
from shardps.proto import ps_pb2
from shardps.server.ps.table_optim import RowwiseAdagrad
from shardps.server.ps.table_shard import TableShard
from shardps.server.ps.tables import table_config
torch.set_num_threads(1)
def spec(rows):
    return ps_pb2.TableSpec(name="t", dim=16, num_embeddings=rows, num_shards=2, optimizer="adagrad",
                            lr=0.1, eps=1e-8, server_init=ps_pb2.ServerInit(kind="normal", b=1, seed=3))
small = TableShard(table_config(spec(20000), 1), RowwiseAdagrad(lr=0.1))  # warm the path
ids = small.layout.ids_on(1, 0, 4096).sort().values
small.apply(ids, small.lookup(ids))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shard = TableShard(table_config(spec({rows}), 1), RowwiseAdagrad(lr=0.1))
ids = shard.layout.ids_on(1, 0, 4096).sort().values
shard.apply(ids, shard.lookup(ids))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, shard.rows)
"""


def test_a_server_initialised_shard_takes_its_rows_bytes_and_no_temporary_of_its_size():
    """Peak memory of filling a 2M-row shard (dim 16, row-wise Adagrad: 68 bytes a row), then a
    pull and a push: its rows' bytes, plus one block's temporaries (about 26 MB measured,
    whatever the shard's size); a temporary over the whole shard (a copy, or the isfinite
    mask of a check over every row, which this test caught) would show."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEASURE.format(rows=4_000_000)],
                          capture_output=True, text=True, timeout=240, check=True)
    grown, rows = map(int, done.stdout.split())
    rows_bytes = rows * (4 * 16 + 4)
    assert rows == 2_000_000
    assert grown <= 1.05 * rows_bytes + 40e6, (grown, rows_bytes)


def _documented_row(seed, table, id_, dim, init):
    """init_rows' formula (its docstring) for one id, in Python ints and floats."""
    import math

    mask = (1 << 64) - 1
    key = tables_lib.name_key(table) ^ tables_lib.mix64_int(seed) ^ tables_lib._SALT_INIT
    s = tables_lib.mix64_int(id_ ^ key)
    u = [((tables_lib.mix64_int((s + t * 0x9E3779B97F4A7C15) & mask) & mask) >> 11) * 2.0 ** -53
         for t in range(2 * dim)]
    if init.kind == "uniform":
        return [init.a + (init.b - init.a) * u[j] for j in range(dim)]
    return [init.a + init.b * math.sqrt(-2.0 * math.log1p(-u[2 * j])) * math.cos(2.0 * math.pi * u[2 * j + 1])
            for j in range(dim)]


def test_init_rows_follow_their_documented_formula():
    """The vectorised, in-place draws are the documented splitmix64 stream: uniform rows
    exactly, normal ones up to libm's last bit (float64 log and cos, rounded to fp32)."""
    ids = torch.tensor([0, 1, -1, 2**62 + 3, -(2**63), 123456789])
    for init, tol in ((UNIFORM, 0.0), (RowInit("normal", 0.2, 3.0), 1e-6)):
        rows = tables_lib.init_rows(17, "emb", ids, 6, init)
        expected = torch.tensor([_documented_row(17, "emb", int(i), 6, init) for i in ids],
                                dtype=torch.float32)
        torch.testing.assert_close(rows, expected, rtol=0, atol=tol)


def test_a_server_initialised_shard_restores_from_its_capture():
    config = TableConfig("t", 4, 5000, 2, 1, seed=3, init=UNIFORM, server_init=True)
    shard = TableShard(config, LazyAdam(lr=0.1))
    ids = shard.layout.ids_on(1, 0, 100).sort().values
    shard.apply(ids, torch.ones(100, 4))
    state = shard.capture()
    restored = TableShard.from_state(state)
    assert restored.config == config
    assert torch.equal(restored.rows_in_slot_order(), shard.rows_in_slot_order())
    assert not torch.equal(restored.rows_in_slot_order(), TableShard(config, LazyAdam()).rows_in_slot_order())
    restored.apply(ids, torch.ones(100, 4))  # one more step: the same rows and optimizer state
    shard.apply(ids, torch.ones(100, 4))
    assert torch.equal(restored.rows_in_slot_order(), shard.rows_in_slot_order())


def test_a_materialised_table_is_seeded_from_its_weight_like_any_table():
    """Once materialised (and, say, loaded with pretrained rows), the weight is the truth: the
    worker sends it with InitRows, and the spec asks the servers for no fill."""
    from shardps.proto import spec as spec_lib
    from shardps.worker.tablesync import TableSync

    job = spec_lib.validate({"model": {"name": "mlp"}, "data": {"dataset": "digits"},
                             "stop": {"max_steps": 1}})
    model = nn.ModuleDict({"a": Embedding(50, 4, init=UNIFORM), "b": Embedding(60, 4, init=UNIFORM)})
    materialize(model.a)
    with torch.no_grad():
        model.a.weight.fill_(2.0)
    sync = TableSync(model, job)
    assert sorted(sync.initial) == ["a"] and sync.initial["a"].eq(2.0).all()
    specs = {s.name: s for s in sync.specs(2)}
    assert not specs["a"].HasField("server_init") and specs["b"].HasField("server_init")
