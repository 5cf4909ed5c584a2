"""A shard's embedding tables (server/ps/tables.py, rows.py), without sockets: sync rounds
apply the combined row gradients when the dense round closes, async applies on arrival and
drops retries, and every refusal changes nothing."""

import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.proto.tables import (
    FixedLayout,
    RowInit,
    TableIdError,
    TableRowsError,
    dynamic_server_of,
    init_rows,
)
from shardps.server.ps.errors import (
    FencedError,
    InvalidConfigError,
    StepAheadError,
    UnknownWorkerError,
)
from shardps.server.ps.registry import ShardRegistry
from shardps.server.ps.replication import Placement, Replicas
from shardps.server.ps.shard import Shard
from shardps.server.ps.table_optim import LazyAdam, RowGrads, combine
from shardps.server.ps.tables import UnknownTableError
from shardps.server.ps.transfer import TransferSender
from tests.harness import poll

SYNC, ASYNC = common_pb2.CONSISTENCY_SYNC, common_pb2.CONSISTENCY_ASYNC
DIM, ROWS, N = 3, 20, 4
ACCEPTED, APPLIED = ps_pb2.PUSH_STATUS_ACCEPTED, ps_pb2.PUSH_STATUS_APPLIED


def make_shard(mode=ASYNC, workers=("w0",), shards=1, index=0, **table) -> Shard:
    spec = dict(name="t", dim=DIM, num_embeddings=ROWS, num_shards=shards, optimizer="lazy_adam",
                lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    config = ps_pb2.ShardConfig(
        job_id="j", shard_index=index, offset=0, length=N, total=N,
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8),
        mode=mode, workers=list(workers), epoch=1, tables=[ps_pb2.TableSpec(**{**spec, **table})])
    shard = Shard(config, torch.zeros(N))
    shard.rows.init("t", torch.arange(shard.rows.held("t").numel(), dtype=torch.float32)
                    .view(-1, DIM) / 10)
    return shard


def rows_of(shard: Shard, ids: torch.Tensor) -> torch.Tensor:
    ready, _, rows = shard.rows.pull("t", ids, 0, 0, 1.0)
    assert ready and rows is not None
    return rows


def test_sync_round_applies_the_batch_weighted_rows_when_the_dense_round_closes():
    shard = make_shard(SYNC, workers=("a", "b"))
    ids = torch.arange(ROWS)
    before = rows_of(shard, ids)
    ga = (torch.tensor([1, 4]), torch.ones(2, DIM))
    gb = (torch.tensor([4, 9]), torch.full((2, DIM), 3.0))
    assert shard.rows.push("t", worker="a", step=0, ids=ga[0], grads=ga[1])[0] == ACCEPTED
    assert shard.rows.push("t", worker="b", step=0, ids=gb[0], grads=gb[1])[0] == ACCEPTED
    assert torch.equal(rows_of(shard, ids), before)  # buffered until the round closes
    shard.push(torch.zeros(N), worker_id="a", step=0, batch_size=1)
    assert shard.rows.stats("t").steps == 0
    shard.push(torch.zeros(N), worker_id="b", step=0, batch_size=3)
    assert shard.version == 1 and shard.rows.stats("t").steps == 1
    # The reference: combine weighted by the dense pushes' batch sizes, then SparseAdam's step.
    gids, grads = combine([RowGrads(*ga, 1), RowGrads(*gb, 3)])
    expected = before.clone()
    LazyAdam(lr=0.1).step(expected, {"exp_avg": torch.zeros_like(expected),
                                      "exp_avg_sq": torch.zeros_like(expected)}, gids, grads)
    assert torch.equal(rows_of(shard, ids), expected)
    # The round has closed: a retry is DUPLICATE (its dense push was applied), a push beyond
    # the open round ahead; neither changes anything.
    assert shard.rows.push("t", worker="a", step=0, ids=ga[0], grads=ga[1])[0] == (
        ps_pb2.PUSH_STATUS_DUPLICATE)
    with pytest.raises(StepAheadError):
        shard.rows.push("t", worker="a", step=5, ids=ga[0], grads=ga[1])
    assert torch.equal(rows_of(shard, ids), expected) and shard.rows.stats("t").steps == 1


def test_sync_round_without_rows_still_counts_a_table_step():
    shard = make_shard(SYNC)
    shard.push(torch.zeros(N), worker_id="w0", step=0)
    assert shard.rows.stats("t").steps == 1


def test_async_applies_on_arrival_and_drops_a_retried_step():
    shard = make_shard(ASYNC)
    ids = torch.tensor([2, 3])
    before = rows_of(shard, ids)
    assert shard.rows.push("t", worker="w0", step=0, ids=ids, grads=torch.ones(2, DIM))[0] == APPLIED
    after = rows_of(shard, ids)
    assert not torch.equal(after, before)
    assert shard.rows.push("t", worker="w0", step=0, ids=ids, grads=torch.ones(2, DIM))[0] == (
        ps_pb2.PUSH_STATUS_DUPLICATE)
    assert torch.equal(rows_of(shard, ids), after) and shard.rows.stats("t").steps == 1


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(ids=torch.tensor([3, 1]), grads=torch.ones(2, DIM)), TableRowsError, "strictly increasing"),
    (dict(ids=torch.tensor([1, 1]), grads=torch.ones(2, DIM)), TableRowsError, "strictly increasing"),
    (dict(ids=torch.tensor([1, 20]), grads=torch.ones(2, DIM)), TableIdError, "id 20 is out of range"),
    (dict(ids=torch.tensor([1, 2]), grads=torch.ones(2, DIM + 1)), TableRowsError, r"fp32\[2, 3\]"),
    (dict(ids=torch.tensor([1, 2]), grads=torch.full((2, DIM), float("nan"))), TableRowsError,
     "non-finite"),
    (dict(ids=torch.tensor([1, 2]), grads=torch.ones(2, DIM), table="u"), UnknownTableError,
     "unknown table 'u'"),
    (dict(ids=torch.tensor([1, 2]), grads=torch.ones(2, DIM), worker="zz"), UnknownWorkerError,
     "not a live worker"),
])
def test_refused_pushes_change_nothing(kwargs, error, message):
    shard = make_shard(ASYNC)
    ids = torch.arange(ROWS)
    before = rows_of(shard, ids)
    call = {"table": "t", "worker": "w0", **kwargs}
    with pytest.raises(error, match=message):
        shard.rows.push(call.pop("table"), step=0, **call)
    assert torch.equal(rows_of(shard, ids), before) and shard.rows.stats("t").steps == 0


def test_a_fenced_incarnation_is_refused_and_a_step_already_pushed_is_a_duplicate():
    shard = make_shard(ASYNC)
    ids, grads = torch.tensor([2]), torch.ones(1, DIM)
    shard.fence({"w0": 2})
    with pytest.raises(FencedError):
        shard.rows.push("t", worker="w0", incarnation=1, step=0, ids=ids, grads=grads)
    shard.push(torch.zeros(N), worker_id="w0", incarnation=2, step=0)
    assert shard.rows.push("t", worker="w0", incarnation=2, step=0, ids=ids, grads=grads)[0] == (
        ps_pb2.PUSH_STATUS_DUPLICATE)
    assert shard.rows.stats("t").steps == 0


def test_ids_of_another_shard_are_refused_naming_the_id():
    shard = make_shard(ASYNC, shards=2, index=0)
    layout = FixedLayout("t", ROWS, 2)
    other = int(layout.ids_on(1)[0])
    with pytest.raises(TableIdError, match=f"id {other} is not on shard 0"):
        shard.rows.push("t", worker="w0", step=0, ids=torch.tensor([other]),
                        grads=torch.ones(1, DIM))
    with pytest.raises(TableIdError, match=f"id {other}"):
        shard.rows.pull("t", torch.tensor([other]), 0, 0, 1.0)


@pytest.mark.parametrize(("table", "message"), [
    (dict(optimizer="sgd"), "optimizer must be one of"),
    (dict(dim=0), "dim must be >= 1"),
    (dict(num_embeddings=-1), "num_embeddings must be >= 1 \\(fixed\\) or 0 \\(dynamic\\)"),
    (dict(num_embeddings=0, init="gauss"), "row init must be normal, uniform or zeros"),
    (dict(num_embeddings=0, max_bytes=10), "max_bytes 10 holds no row of"),
    (dict(num_embeddings=0, sketch_width=1 << 25, admit_after=2), "sketch_width must be <="),
    (dict(num_embeddings=0, sketch_width=100, admit_after=2), "sketch width must be a power of two"),
    (dict(num_embeddings=0, evict_after_steps=-1), "bad evict_after_steps"),
    (dict(lr=0.0), "lr must be > 0"),
])
def test_bad_table_specs_are_refused_naming_the_table(table, message):
    with pytest.raises(InvalidConfigError, match=message) as refused:
        make_shard(**table)
    assert "'t'" in str(refused.value)



# -- dynamic tables (num_embeddings 0) ----------------------------------------------------------


def dynamic_shard(mode=ASYNC, workers=("w0",), shards=1, index=0, **table) -> Shard:
    spec = dict(name="d", dim=DIM, num_embeddings=0, num_shards=shards, optimizer="lazy_adam",
                lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, seed=5, init="uniform", init_a=-1,
                init_b=1)
    config = ps_pb2.ShardConfig(
        job_id="j", shard_index=index, offset=0, length=N, total=N,
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8),
        mode=mode, workers=list(workers), epoch=1, tables=[ps_pb2.TableSpec(**{**spec, **table})])
    return Shard(config, torch.zeros(N))


def test_a_dynamic_table_spec_builds_the_table_it_describes():
    shard = dynamic_shard(admit_after=2, evict_after_steps=3, max_rows=7, sketch_width=64,
                          sketch_depth=2, sketch_halve_every=5)
    table = shard._core.tables.get("d")
    config = table.config
    assert (config.num_embeddings, config.seed, config.init) == (None, 5, RowInit("uniform", -1, 1))
    assert (config.admit_after, config.evict_after_steps, config.max_rows) == (2, 3, 7)
    assert (config.sketch_width, config.sketch_depth, config.sketch_halve_every) == (64, 2, 5)
    assert table.row_cap == 7
    # Defaults: "" is N(0, 1), zeros are the core's defaults.
    plain = dynamic_shard(init="", init_a=0, init_b=0)._core.tables.get("d").config
    assert plain.init == RowInit() and plain.admit_after == 1 and plain.sketch_width == 1 << 20


def test_dynamic_rows_start_from_init_rows_and_sync_rounds_apply_them():
    shard = dynamic_shard(SYNC, workers=("a", "b"))
    ids = torch.tensor([-(2**63), -5, 12, 2**63 - 1])
    start = init_rows(5, "d", ids, DIM, RowInit("uniform", -1, 1))
    assert torch.equal(rows_of_table(shard, "d", ids), start)
    grads = torch.ones(2, DIM)
    assert shard.rows.push("d", worker="a", step=0, ids=ids[:2], grads=grads)[0] == ACCEPTED
    shard.push(torch.zeros(N), worker_id="a", step=0, batch_size=1)
    shard.push(torch.zeros(N), worker_id="b", step=0, batch_size=1)
    # One lazy Adam step with the lone contribution: rows move by lr against the gradient sign.
    after = rows_of_table(shard, "d", ids)
    assert torch.allclose(after[:2], start[:2] - 0.1, atol=1e-5) and torch.equal(after[2:], start[2:])
    assert shard.rows.stats("d").steps == 1 and shard.rows.stats("d").admissions == 4


def rows_of_table(shard: Shard, table: str, ids: torch.Tensor) -> torch.Tensor:
    ready, _, rows = shard.rows.pull(table, ids, 0, 0, 1.0)
    assert ready and rows is not None
    return rows


def test_dynamic_ids_of_another_shard_are_refused_even_when_buffered():
    shard = dynamic_shard(SYNC, shards=2, index=0)
    ids = torch.arange(-50, 50)
    other = ids[dynamic_server_of("d", ids, 2) == 1][:1]
    with pytest.raises(TableIdError, match=f"id {int(other)} is not on shard 0"):
        shard.rows.push("d", worker="w0", step=0, ids=other, grads=torch.ones(1, DIM))
    with pytest.raises(TableIdError, match=f"id {int(other)}"):
        shard.rows.pull("d", other, 0, 0, 1.0)
    assert shard._core.tables.pending == {} and shard.rows.stats("d").rows == 0


def test_export_pages_through_a_dynamic_table_in_id_order_without_touching_it():
    shard = dynamic_shard(admit_after=1)
    ids = torch.tensor([-9, -3, 0, 4, 8, 2**62])
    rows = rows_of_table(shard, "d", ids)
    got, after, pages = [], None, 0
    while True:
        ready, _, page = shard.rows.export("d", after, 4, 0, 1.0)
        assert ready and page is not None
        page_ids, page_rows, more = page
        got.append((page_ids, page_rows))
        pages += 1
        if not more:
            break
        after = int(page_ids[-1])
    assert pages == 2
    assert torch.equal(torch.cat([g[0] for g in got]), ids)
    assert torch.equal(torch.cat([g[1] for g in got]), rows)
    assert shard.rows.stats("d").admissions == ids.numel()  # reading created nothing
    with pytest.raises(TableRowsError, match="is fixed"):
        make_shard().rows.export("t", None, 4, 0, 1.0)
    with pytest.raises(TableRowsError, match="max_rows must be >= 1"):
        shard.rows.export("d", None, 0, 0, 1.0)


def test_a_shard_with_tables_is_never_transferred_to_a_joining_copy(caplog):
    """Row pushes are not forwarded to copies, so a copy (a reshard's move, re-replication)
    would miss those after its capture: the transfer fails before anything is sent."""
    registry, results = ShardRegistry(), []
    registry.put(make_shard())
    sender = TransferSender(Replicas(lambda: "me"), registry, lambda: "me", results.append)
    sender.placement_changed("j", 0, Placement(2, "me", (), (("joiner", "127.0.0.1:1", 2),)))
    poll(lambda: "failed: a shard with embedding tables cannot be transferred" in caplog.text,
         10, interval=0.01, what="the transfer's failure logged")
    assert results == ["failed"]
