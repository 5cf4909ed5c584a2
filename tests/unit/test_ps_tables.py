"""A shard's embedding tables (server/ps/tables.py, rows.py), without sockets: sync rounds
apply the combined row gradients when the dense round closes, async applies on arrival and
drops retries, and every refusal changes nothing."""

import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.proto.tables import FixedLayout, TableIdError, TableRowsError
from shardps.server.ps.errors import (
    FencedError,
    InvalidConfigError,
    StepAheadError,
    UnknownWorkerError,
)
from shardps.server.ps.shard import Shard
from shardps.server.ps.table_optim import LazyAdam, RowGrads, combine
from shardps.server.ps.tables import UnknownTableError

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
    (dict(num_embeddings=0), "num_embeddings must be >= 1"),
    (dict(lr=0.0), "lr must be > 0"),
])
def test_bad_table_specs_are_refused_naming_the_table(table, message):
    with pytest.raises(InvalidConfigError, match=message) as refused:
        make_shard(**table)
    assert "'t'" in str(refused.value)
