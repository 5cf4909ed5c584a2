"""server/ps/table_shard.py: fixed and dynamic table shards (rows, admission, eviction, caps,
checkpoints, export) and their exactness against torch.optim.SparseAdam."""

from dataclasses import replace

import pytest
import torch

from shardps.proto import tables
from shardps.proto.tables import FixedLayout, RowInit, TableIdError, TableRowsError
from shardps.server.ps.table_config import TableConfig, TableState
from shardps.server.ps.table_optim import LazyAdam, RowwiseAdagrad
from shardps.server.ps.table_shard import CAP_SLACK, TableShard

DIM = 4


def _fixed(n: int, servers: int, full: torch.Tensor, opt=lambda: LazyAdam(lr=0.05)):
    layout = FixedLayout("emb", n, servers)
    return [TableShard(TableConfig("emb", DIM, n, servers, s), opt(), full[layout.ids_on(s)].clone())
            for s in range(servers)]


def _split(name, ids, grads, servers, layout=None):
    """A coalesced gradient cut into each server's part (ids stay sorted)."""
    where = layout.place(ids)[0] if layout else tables.dynamic_server_of(name, ids, servers)
    return [(ids[where == s], grads[where == s]) for s in range(servers)]


def _coalesced_steps(seed, steps, n, universe=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        k = int(torch.randint(0, 40, (), generator=gen))
        pick = torch.randint(0, n, (k,), generator=gen)
        idx = pick if universe is None else universe[pick]
        if universe is None:
            grad = torch.sparse_coo_tensor(idx[None], torch.randn(k, DIM, generator=gen), (n, DIM),
                                           check_invariants=True).coalesce()
            yield grad, grad.indices()[0], grad.values()
        else:
            ids, inverse = torch.unique(idx, return_inverse=True)
            grads = torch.zeros(ids.numel(), DIM).index_add_(0, inverse, torch.randn(k, DIM, generator=gen))
            yield None, ids, grads


@pytest.mark.parametrize("servers", [1, 3])
def test_fixed_shards_train_like_sparse_adam_on_the_whole_table(servers):
    n = 300
    full = torch.randn(n, DIM, generator=torch.Generator().manual_seed(0))
    shards = _fixed(n, servers, full)
    param = torch.nn.Parameter(full.clone())
    ref = torch.optim.SparseAdam([param], lr=0.05)
    layout = shards[0].layout
    for grad, ids, values in _coalesced_steps(1, 15, n):
        param.grad = grad
        ref.step()
        for shard, (part_ids, part) in zip(shards, _split("emb", ids, values, servers, layout), strict=True):
            shard.apply(part_ids, part)  # every server steps, with or without rows of its own
    got = tables.assemble_fixed(layout, {s: sh.rows_in_slot_order() for s, sh in enumerate(shards)})
    assert torch.equal(got, param.detach())
    ids = torch.tensor([0, 5, 17, 299])
    for s, (part_ids, _) in enumerate(_split("emb", ids, torch.zeros(4, DIM), servers, layout)):
        assert torch.equal(shards[s].lookup(part_ids), param.detach()[part_ids])
    assert all(sh.steps == 15 for sh in shards)


def test_fixed_rowwise_adagrad_touches_only_its_rows():
    full = torch.randn(40, DIM)
    (shard,) = _fixed(40, 1, full, lambda: RowwiseAdagrad(lr=0.1))
    shard.apply(torch.tensor([3, 9]), torch.ones(2, DIM))
    rows = shard.rows_in_slot_order()
    layout = shard.layout
    slots = layout.place(torch.tensor([3, 9]))[1]
    changed = (rows != full[layout.ids_on(0)]).any(1).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(slots.tolist())
    assert shard.stats().bytes == 40 * (4 * DIM + 4) == shard.nbytes()
    assert shard.row_bytes() == 4 * DIM + 4


def test_hostile_ids_and_rows_are_refused_and_change_nothing():
    n = 20
    full = torch.randn(n, DIM)
    a, b = _fixed(n, 2, full)
    layout = a.layout
    mine = layout.ids_on(0).sort().values
    theirs = layout.ids_on(1).sort().values
    before = a.capture()
    cases = [
        (TableIdError, "table 'emb': id 20 is out of range", torch.tensor([0, 20]), torch.zeros(2, DIM)),
        (TableIdError, "id -3 is out of range", torch.tensor([-3]), torch.zeros(1, DIM)),
        (TableIdError, f"id {int(theirs[0])} is not on server 0", theirs[:1], torch.zeros(1, DIM)),
        (TableRowsError, "strictly increasing", mine[:2].flip(0), torch.zeros(2, DIM)),
        (TableRowsError, "strictly increasing", mine[:1].repeat(2), torch.zeros(2, DIM)),
        (TableRowsError, "1-D int64", mine[:2].float(), torch.zeros(2, DIM)),
        (TableRowsError, r"fp32\[2, 4\]", mine[:2], torch.zeros(2, DIM + 1)),
        (TableRowsError, r"fp32\[2, 4\]", mine[:2], torch.zeros(2, DIM, dtype=torch.float16)),
        (TableRowsError, "non-finite", mine[:2], torch.tensor([[float("nan")] * DIM, [0.0] * DIM])),
    ]
    for error, message, ids, grads in cases:
        with pytest.raises(error, match=message):
            a.apply(ids, grads)
        if grads.shape == (ids.numel(), DIM) and grads.dtype == torch.float32 and "finite" not in message:
            with pytest.raises(error, match=message):
                a.lookup(ids)
    _assert_same(a.capture(), before)
    assert a.steps == 0


def test_fixed_rows_stream_in_by_slot_and_export_by_id():
    layout = FixedLayout("emb", 11, 2)
    shard = TableShard(TableConfig("emb", DIM, 11, 2, 1), LazyAdam())
    full = torch.arange(11 * DIM, dtype=torch.float32).view(11, DIM)
    mine = full[layout.ids_on(1)]
    shard.write_rows(0, mine[:2])
    shard.write_rows(2, mine[2:])
    ids, rows = shard.export()
    assert torch.equal(ids, layout.ids_on(1).sort().values) and torch.equal(rows, full[ids])
    with pytest.raises(ValueError, match="outside"):
        shard.write_rows(4, mine)


def _dynamic(**kw):
    kw.setdefault("seed", 3)
    return TableShard(TableConfig("dyn", DIM, None, **kw), LazyAdam(lr=0.1))


def _ids(*xs):
    return torch.tensor(sorted(xs), dtype=torch.int64)


def test_a_dynamic_row_starts_from_init_rows_on_first_touch():
    shard = _dynamic(init=RowInit("uniform", -1, 1))
    ids = _ids(-(2**63), -5, 0, 7, 2**63 - 1)
    rows = shard.lookup(ids)
    assert torch.equal(rows, tables.init_rows(3, "dyn", ids, DIM, RowInit("uniform", -1, 1)))
    assert shard.stats().admissions == 5 and shard.stats().rows == 5
    assert torch.equal(shard.lookup(ids), rows)  # held now: same values, no new admissions
    assert shard.stats().admissions == 5


def test_a_dynamic_row_trains_the_same_wherever_it_lands():
    universe = torch.randint(-(2**62), 2**62, (500,), generator=torch.Generator().manual_seed(5))
    results = []
    for servers in (1, 3):
        shards = [_dynamic(num_servers=servers, server_index=s) for s in range(servers)]
        for _, ids, grads in _coalesced_steps(6, 10, universe.numel(), universe):
            for shard, (part_ids, part) in zip(shards, _split("dyn", ids, grads, servers), strict=True):
                shard.lookup(part_ids)
                shard.apply(part_ids, part)
        results.append(tables.merge_dynamic([sh.export() for sh in shards]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_admission_after_k_sightings():
    shard = _dynamic(admit_after=3, sketch_width=1 << 10)
    ids = _ids(10, 20)
    for _ in range(2):
        assert shard.lookup(ids).eq(0).all()
        assert shard.apply(ids, torch.ones(2, DIM)) == 0  # gradients of unadmitted ids dropped
    assert shard.lookup(ids, count=False).eq(0).all()  # a retried pull does not count
    stats = shard.stats()
    assert (stats.rows, stats.unadmitted_reads, stats.dropped_rows, stats.steps) == (0, 6, 4, 2)
    rows = shard.lookup(ids)  # the third sighting: admitted, with its initial value
    assert torch.equal(rows, tables.init_rows(3, "dyn", ids, DIM, RowInit()))
    assert shard.apply(ids, torch.ones(2, DIM)) == 2
    assert not torch.equal(shard.lookup(ids), rows)
    assert shard.stats().admissions == 2


def test_rows_idle_for_t_steps_are_evicted():
    shard = _dynamic(evict_after_steps=2)
    none = torch.zeros(0, dtype=torch.int64)
    shard.lookup(_ids(1, 2, 3))               # step 0
    shard.apply(_ids(1), torch.ones(1, DIM))  # ends step 0
    shard.lookup(_ids(2))                     # step 1
    shard.apply(none, torch.zeros(0, DIM))    # ends step 1: nothing idle for 2 steps yet
    assert shard.stats().rows == 3
    shard.apply(none, torch.zeros(0, DIM))    # ends step 2: 1 and 3 untouched in steps 1, 2
    ids, _ = shard.export()
    assert ids.tolist() == [2] and shard.stats().evicted_idle == 2
    shard.apply(none, torch.zeros(0, DIM))    # step 3
    assert shard.stats().rows == 0 and shard.stats().evicted_idle == 3
    # an evicted id comes back fresh: its initial value and zero moments
    fresh = shard.lookup(_ids(1))
    assert torch.equal(fresh, tables.init_rows(3, "dyn", _ids(1), DIM, RowInit()))
    assert shard.capture().tensors["state.exp_avg"].eq(0).all()


def test_the_cap_evicts_least_recently_touched_rows_first():
    cap = 2 * CAP_SLACK  # the slack is cap // 64 = 2 rows
    shard = _dynamic(max_rows=cap)
    none = torch.zeros(0, dtype=torch.int64)
    shard.lookup(torch.arange(0, 100))        # step 0
    shard.apply(none, torch.zeros(0, DIM))
    shard.lookup(torch.arange(100, 128))      # step 1: full
    shard.apply(none, torch.zeros(0, DIM))
    shard.lookup(_ids(5, 6))                  # step 2: 5 and 6 recently used
    assert shard.stats().rows == cap and shard.stats().evicted_cap == 0
    shard.lookup(_ids(500))                   # still step 2: evicts 1 + slack 2 of step 0's rows
    held = set(shard.export()[0].tolist())
    assert {0, 1, 2}.isdisjoint(held) and {3, 4, 5, 6, 500}.issubset(held)
    assert shard.stats().rows == cap - 2 and shard.stats().evicted_cap == 3


def test_the_cap_holds_even_when_one_batch_alone_overflows_it():
    shard = _dynamic(max_rows=64)
    shard.lookup(torch.arange(40))  # step 0
    shard.apply(torch.zeros(0, dtype=torch.int64), torch.zeros(0, DIM))
    rows = shard.lookup(torch.arange(40, 140))  # step 1, 100 new ids: the 40 old rows go, 64 fit
    assert shard.stats().rows == 64 and shard.stats().evicted_cap == 40
    assert rows[:64].ne(0).any(1).all() and rows[64:].eq(0).all()
    held = shard.export()[0]
    assert held.tolist() == list(range(40, 104))  # the first 64 of the batch, in id order
    # still step 1: every row was touched in it, so none is evicted for newer ids
    assert shard.lookup(torch.arange(1000, 1010)).eq(0).all()
    assert torch.equal(shard.export()[0], held)
    assert shard.apply(torch.arange(40, 140), torch.ones(100, DIM)) == 64
    assert shard.stats().dropped_rows == 36 and shard.stats().unadmitted_reads == 46
    # step 2: room is made, least recent first and then smallest ids (40..50), plus the slack
    assert shard.lookup(torch.arange(1000, 1010)).ne(0).any(1).all()
    assert shard.stats().rows == 63 and shard.stats().evicted_cap == 40 + 11
    assert shard.export()[0].tolist() == list(range(51, 104)) + list(range(1000, 1010))


def test_a_byte_cap_is_a_row_cap():
    shard = _dynamic(max_bytes=10_000)
    assert shard.row_cap == 10_000 // shard.row_bytes()
    assert shard.row_bytes() == 4 * DIM * 3 + 16 + 54
    with pytest.raises(ValueError, match="holds no row"):
        _dynamic(max_bytes=10)


def test_dynamic_ids_of_another_server_are_refused():
    shard = _dynamic(num_servers=2, server_index=0)
    ids = torch.arange(50)
    theirs = ids[tables.dynamic_server_of("dyn", ids, 2) == 1]
    with pytest.raises(TableIdError, match=f"id {int(theirs[0])} is not on server 0"):
        shard.lookup(theirs)
    assert shard.stats().rows == 0


def test_memory_follows_the_rows_held():
    shard = _dynamic(evict_after_steps=1)
    empty = shard.nbytes()
    shard.lookup(torch.arange(50_000))
    full = shard.nbytes()
    assert full > 50_000 * shard.row_bytes() * 0.9
    shard.apply(torch.zeros(0, dtype=torch.int64), torch.zeros(0, DIM))
    shard.apply(torch.zeros(0, dtype=torch.int64), torch.zeros(0, DIM))
    assert shard.stats().rows == 0 and shard.nbytes() < full / 4 and shard.nbytes() >= empty


def _workload(shard: TableShard, seed: int, steps: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.unique(torch.randint(0, 300, (120,), generator=gen))
        shard.lookup(ids)
        shard.apply(ids, torch.randn(ids.numel(), DIM, generator=gen))


def _assert_same(a: TableState, b: TableState):
    assert (a.config, a.optimizer, a.counters, a.sketch) == (b.config, b.optimizer, b.counters, b.sketch)
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_capture_and_restore_continue_bitwise(kind):
    if kind == "dynamic":
        config = TableConfig("dyn", DIM, None, seed=1, admit_after=2, evict_after_steps=2,
                             max_rows=100, sketch_width=1 << 12, sketch_halve_every=4)
        shard = TableShard(config, RowwiseAdagrad(lr=0.1, initial_accumulator_value=0.5))
    else:
        config = TableConfig("emb", DIM, 300)
        shard = TableShard(config, LazyAdam(lr=0.1), torch.randn(300, DIM))
    _workload(shard, 0, 8)
    state = shard.capture()
    again = TableShard.from_state(state)
    _assert_same(again.capture(), state)
    _workload(shard, 1, 8)
    _workload(again, 1, 8)
    _assert_same(shard.capture(), again.capture())
    # the same counters; allocated sizes may differ (the restored one grew from its checkpoint)
    assert replace(shard.stats(), bytes=0, capacity=0) == replace(again.stats(), bytes=0, capacity=0)
    if kind == "dynamic":
        stats = shard.stats()
        assert stats.admissions and stats.evicted_idle and stats.evicted_cap and stats.rows <= 100
    wider = TableConfig(config.name, DIM + 1, config.num_embeddings)
    with pytest.raises(ValueError, match="checkpoint weights"):
        TableShard.from_state(TableState(wider, state.optimizer, state.counters, state.tensors, state.sketch))
    if kind == "fixed":
        rows = {**state.tensors, "weights": state.tensors["weights"][:-1]}
        with pytest.raises(ValueError, match="holds 299 rows"):
            TableShard.from_state(TableState(config, state.optimizer, state.counters, rows))


def test_config_is_checked():
    with pytest.raises(ValueError, match="dynamic tables"):
        TableConfig("t", 4, 10, admit_after=2)
    with pytest.raises(ValueError, match="dim"):
        TableConfig("t", 0)
    with pytest.raises(ValueError, match="server"):
        TableConfig("t", 4, None, num_servers=2, server_index=2)
    with pytest.raises(ValueError, match="admit_after"):
        TableConfig("t", 4, None, admit_after=0)
    with pytest.raises(ValueError, match="starts empty"):
        TableShard(TableConfig("t", 4), LazyAdam(), torch.zeros(1, 4))
    config = TableConfig("t", 4, None, init=RowInit("uniform", 0, 1), max_rows=3)
    assert TableConfig.from_dict(config.to_dict()) == config
