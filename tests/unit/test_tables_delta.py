"""server/ps/table_delta.py and the changed-slot tracking of fixed tables (table_rows.py,
TableShard.capture): a delta applied to its base is the full capture, bitwise, through
pushes, InitRows-style writes and restores; malformed deltas are refused; dynamic tables are
captured in full only; when a delta is taken."""

from dataclasses import replace

import pytest
import torch

from shardps.proto.tables import FixedLayout
from shardps.server.ps.table_config import TableConfig
from shardps.server.ps.table_delta import SLOTS, apply_delta, is_delta, take_delta
from shardps.server.ps.table_optim import LazyAdam, RowwiseAdagrad
from shardps.server.ps.table_shard import TableShard

N, DIM, SERVERS = 500, 4, 2


def _shard(opt, server=1) -> TableShard:
    rows = FixedLayout("emb", N, SERVERS).rows_on(server)
    weights = torch.randn(rows, DIM, generator=torch.Generator().manual_seed(server))
    return TableShard(TableConfig("emb", DIM, N, SERVERS, server), opt(), weights)


def _push(shard: TableShard, seed: int, k: int = 12) -> set[int]:
    """One step on k random rows of the shard; returns their slots."""
    gen = torch.Generator().manual_seed(seed)
    ids = FixedLayout("emb", N, SERVERS).ids_on(shard.config.server_index)
    pick = torch.unique(ids[torch.randint(0, ids.numel(), (k,), generator=gen)])
    shard.apply(pick, torch.randn(pick.numel(), DIM, generator=gen))
    return set(FixedLayout("emb", N, SERVERS).place(pick)[1].tolist())


def _assert_bitwise(a, b) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    for key in a.tensors:
        assert a.tensors[key].dtype == b.tensors[key].dtype
        assert torch.equal(a.tensors[key].view(torch.uint8), b.tensors[key].view(torch.uint8)), key
    assert a.optimizer == b.optimizer and a.counters == b.counters


@pytest.mark.parametrize("opt", [lambda: LazyAdam(lr=0.05), lambda: RowwiseAdagrad(lr=0.1)])
def test_base_plus_delta_is_the_full_capture_bitwise(opt):
    shard = _shard(opt)
    base = shard.capture(new_base=True)
    for step in range(5):
        _push(shard, step)
        delta = shard.capture(changed_only=True)
        assert is_delta(delta) and 0 < delta.tensors[SLOTS].numel() <= 12 * (step + 1)
        _assert_bitwise(apply_delta(base, delta), shard.capture())
    # A restore from base + delta continues exactly like the shard itself.
    again = TableShard.from_state(apply_delta(base, shard.capture(changed_only=True)))
    _push(shard, 99)
    _push(again, 99)
    _assert_bitwise(again.capture(), shard.capture())


def test_untouched_shard_gives_an_empty_delta_and_the_first_capture_is_everything():
    shard = _shard(lambda: LazyAdam(lr=0.05))
    first = shard.capture(changed_only=True)
    assert first.tensors[SLOTS].numel() == shard.rows  # nothing captured yet: all changed
    base = shard.capture(new_base=True)
    empty = shard.capture(changed_only=True)
    assert empty.tensors[SLOTS].numel() == 0 and empty.tensors["weights"].shape == (0, DIM)
    _assert_bitwise(apply_delta(base, empty), base)


def test_a_delta_since_a_new_base_holds_only_later_changes():
    shard = _shard(lambda: LazyAdam(lr=0.05))
    shard.capture(new_base=True)
    first = _push(shard, 1)
    middle = shard.capture(changed_only=True, new_base=True)  # chained: delta, then anew
    second = _push(shard, 2)
    last = shard.capture(changed_only=True)
    assert set(middle.tensors[SLOTS].tolist()) == first
    assert set(last.tensors[SLOTS].tolist()) == second and first - second


def test_written_rows_and_a_restore_count_as_changed():
    shard = _shard(lambda: RowwiseAdagrad(lr=0.1))
    base = shard.capture(new_base=True)
    shard.write_rows(3, torch.ones(5, DIM))
    delta = shard.capture(changed_only=True)
    assert delta.tensors[SLOTS].tolist() == [3, 4, 5, 6, 7]
    _assert_bitwise(apply_delta(base, delta), shard.capture())
    shard.capture(new_base=True)
    shard.restore(base)
    assert shard.capture(changed_only=True).tensors[SLOTS].numel() == shard.rows


def test_malformed_deltas_are_refused_naming_the_table():
    shard = _shard(lambda: LazyAdam(lr=0.05))
    base = shard.capture(new_base=True)
    _push(shard, 3)
    delta = shard.capture(changed_only=True)
    slots = delta.tensors[SLOTS]

    def with_tensors(**kw):
        return replace(delta, tensors={**delta.tensors, **kw})

    bad = [
        with_tensors(slots=slots.flip(0)),                       # out of order
        with_tensors(slots=slots + shard.rows),                  # out of range
        with_tensors(slots=slots.to(torch.int32)),               # dtype
        with_tensors(weights=delta.tensors["weights"][:-1]),      # rows != slots
        with_tensors(**{"state.exp_avg": delta.tensors["state.exp_avg"].double()}),
        replace(delta, tensors={k: v for k, v in delta.tensors.items() if k != "state.exp_avg"}),
    ]
    assert slots.numel() > 1
    for wrong in bad:
        with pytest.raises(ValueError, match="table 'emb'"):
            apply_delta(base, wrong)
    with pytest.raises(ValueError, match="base must be a full capture"):
        apply_delta(delta, delta)
    with pytest.raises(ValueError, match="base must be a full capture"):
        apply_delta(base, base)


def test_dynamic_tables_are_captured_in_full_only():
    dynamic = TableShard(TableConfig("dyn", DIM, None, 1, 0), LazyAdam(lr=0.05))
    dynamic.lookup(torch.tensor([5, 9]))
    with pytest.raises(ValueError, match="dynamic"):
        dynamic.capture(changed_only=True)
    assert dynamic.capture(new_base=True).tensors["ids"].tolist() == [5, 9]


@pytest.mark.parametrize(("changed", "rows", "since", "every", "want"), [
    (10, 100, 0, 4, True), (50, 100, 2, 4, True), (51, 100, 0, 4, False),
    (10, 100, 3, 4, False), (0, 100, 0, 1, False), (0, 0, 0, 4, True)])
def test_take_delta(changed, rows, since, every, want):
    assert take_delta(changed, rows, since, every) is want
