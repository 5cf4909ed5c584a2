"""proto/tables.py: the id hash, the sharding of fixed and dynamic tables, initial rows, checks."""

import math

import pytest
import torch

from shardps.proto import tables

EDGE_IDS = [0, 1, -1, 2, 12345, -(2**63), 2**63 - 1, 2**62, -(2**40) + 7]


def test_mix64_is_splitmix64_with_wrapping_int64_arithmetic():
    got = tables.mix64(torch.tensor(EDGE_IDS, dtype=torch.int64)).tolist()
    assert got == [tables.mix64_int(x) for x in EDGE_IDS]
    # splitmix64's published first output for seed 0 (Vigna's reference implementation)
    assert tables.mix64_int(0) & ((1 << 64) - 1) == 0xE220A8397B1DCDAF


def test_name_key_is_stable_and_signed():
    assert tables.name_key("user") == tables.name_key("user")
    assert tables.name_key("user") != tables.name_key("item")
    assert -(2**63) <= tables.name_key("x") < 2**63


def _chi2_uniform(counts: torch.Tensor) -> float:
    expected = counts.sum().item() / counts.numel()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def _assert_even(servers: torch.Tensor, num_servers: int):
    counts = torch.bincount(servers, minlength=num_servers)
    # chi-square with S - 1 degrees of freedom: mean S - 1, sd sqrt(2 (S - 1)); 6 sd is never
    # reached by a fair spread and always by a skewed one at these sizes
    dof = num_servers - 1
    assert _chi2_uniform(counts) < dof + 6 * math.sqrt(2 * dof), counts


@pytest.mark.parametrize("num_servers", [2, 3, 7, 16])
def test_dynamic_ids_spread_evenly_whatever_their_pattern(num_servers):
    n = 70_000
    patterns = {
        "consecutive": torch.arange(n),
        "strided by 1024": torch.arange(n) * 1024,
        "strided by the server count": torch.arange(n) * num_servers,
        "negative": -torch.arange(1, n + 1),
        "high bits only": torch.arange(n) << 40,
        "random": torch.randint(-(2**63), 2**63 - 1, (n,), generator=torch.Generator().manual_seed(1)),
    }
    for ids in patterns.values():
        _assert_even(tables.dynamic_server_of("t", ids, num_servers), num_servers)


def test_dynamic_hot_ids_of_two_tables_land_independently():
    ids = torch.arange(2000)
    a = tables.dynamic_server_of("a", ids, 8)
    b = tables.dynamic_server_of("b", ids, 8)
    assert 0.05 < (a == b).double().mean() < 0.2  # 1/8 if independent


def test_one_server_holds_everything():
    assert tables.dynamic_server_of("t", torch.tensor(EDGE_IDS), 1).eq(0).all()
    layout = tables.FixedLayout("t", 10, 1)
    server, slot = layout.place(torch.arange(10))
    assert server.eq(0).all() and torch.equal(torch.sort(slot).values, torch.arange(10))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097, 30_011])
@pytest.mark.parametrize("num_servers", [1, 2, 3, 5])
def test_fixed_layout_is_a_balanced_bijection(n, num_servers):
    layout = tables.FixedLayout("emb", n, num_servers)
    ids = torch.arange(n)
    pos = layout.position(ids)
    assert torch.equal(torch.sort(pos).values, ids)  # a permutation of [0, N)
    server, slot = layout.place(ids)
    assert sum(layout.rows_on(s) for s in range(num_servers)) == n
    for s in range(num_servers):
        held = layout.ids_on(s)
        assert held.numel() == layout.rows_on(s) == int((server == s).sum())
        assert server[held].eq(s).all() and torch.equal(slot[held], torch.arange(held.numel()))
        # a window of slots is the same ids
        assert torch.equal(layout.ids_on(s, 1, 4), held[1:4])


def test_fixed_layout_spreads_consecutive_and_strided_ids():
    layout = tables.FixedLayout("emb", 1_000_000, 7)
    for ids in (torch.arange(50_000), torch.arange(50_000) * 7, torch.arange(50_000) * 16):
        _assert_even(layout.place(ids)[0], 7)
    # a different table with the same N places rows elsewhere
    other = tables.FixedLayout("emb2", 1_000_000, 7)
    assert not torch.equal(other.position(torch.arange(100)), layout.position(torch.arange(100)))


def test_fixed_layout_refuses_bad_sizes():
    with pytest.raises(ValueError, match="num_embeddings"):
        tables.FixedLayout("t", 0, 1)
    with pytest.raises(ValueError, match="num_servers"):
        tables.FixedLayout("t", 5, 0)


def test_assemble_fixed_puts_rows_back_in_id_order():
    layout = tables.FixedLayout("emb", 101, 3)
    full = torch.randn(101, 4)
    parts = {s: full[layout.ids_on(s)] for s in range(3)}
    assert torch.equal(tables.assemble_fixed(layout, parts), full)
    with pytest.raises(ValueError, match="servers"):
        tables.assemble_fixed(layout, {0: parts[0]})
    with pytest.raises(ValueError, match="rows"):
        tables.assemble_fixed(layout, {**parts, 1: parts[1][:-1]})


def test_merge_dynamic_sorts_by_id():
    ids, rows = tables.merge_dynamic([(torch.tensor([5, -3]), torch.tensor([[5.0], [-3.0]])),
                                      (torch.tensor([0]), torch.tensor([[0.0]]))])
    assert ids.tolist() == [-3, 0, 5] and rows.flatten().tolist() == [-3.0, 0.0, 5.0]


def test_init_rows_depend_only_on_seed_table_and_id():
    ids = torch.tensor(EDGE_IDS)
    init = tables.RowInit()
    rows = tables.init_rows(7, "t", ids, 5, init)
    assert rows.dtype == torch.float32 and rows.shape == (len(EDGE_IDS), 5)
    # the same row whatever batch it comes in, in any order, one at a time
    perm = torch.randperm(len(EDGE_IDS), generator=torch.Generator().manual_seed(0))
    assert torch.equal(tables.init_rows(7, "t", ids[perm], 5, init), rows[perm])
    for i, x in enumerate(EDGE_IDS):
        assert torch.equal(tables.init_rows(7, "t", torch.tensor([x]), 5, init)[0], rows[i])
    assert not torch.equal(tables.init_rows(8, "t", ids, 5, init), rows)
    assert not torch.equal(tables.init_rows(7, "u", ids, 5, init), rows)
    # the first columns do not depend on the width
    assert torch.equal(tables.init_rows(7, "t", ids, 3, init), rows[:, :3])


def test_init_rows_distributions():
    ids = torch.arange(20_000)
    normal = tables.init_rows(0, "t", ids, 16, tables.RowInit("normal", 0.5, 2.0))
    assert abs(normal.mean().item() - 0.5) < 0.01 and abs(normal.std().item() - 2.0) < 0.01
    assert torch.isfinite(normal).all()
    uniform = tables.init_rows(0, "t", ids, 16, tables.RowInit("uniform", -0.1, 0.3))
    assert uniform.min() >= -0.1 and uniform.max() < 0.3
    assert abs(uniform.mean().item() - 0.1) < 0.002
    assert tables.init_rows(0, "t", ids, 3, tables.RowInit("zeros")).eq(0).all()
    assert tables.init_rows(0, "t", torch.zeros(0, dtype=torch.int64), 3, tables.RowInit()).shape == (0, 3)


def test_row_init_refuses_nonsense():
    for kind, a, b in [("gamma", 0, 1), ("normal", 0, -1), ("uniform", 1, 0), ("normal", math.nan, 1)]:
        with pytest.raises(ValueError):
            tables.RowInit(kind, a, b)


def test_check_ids_names_the_table_and_the_id():
    tables.check_ids("t", torch.tensor([0, 3, 9]), 10, unique_sorted=True)
    with pytest.raises(tables.TableIdError, match=r"table 't': id 10 is out of range \[0, 10\)") as err:
        tables.check_ids("t", torch.tensor([0, 10, 11]), 10)
    assert err.value.table == "t" and err.value.id == 10
    assert isinstance(err.value, IndexError) and isinstance(err.value, ValueError)
    with pytest.raises(tables.TableIdError, match="id -1 "):
        tables.check_ids("t", torch.tensor([-1]), 10)
    for bad in (torch.tensor([1.0]), torch.tensor([[1]]), torch.tensor([True])):
        with pytest.raises(tables.TableRowsError, match="1-D int64"):
            tables.check_ids("t", bad)
    for unsorted in ([2, 1], [1, 1]):
        with pytest.raises(tables.TableRowsError, match="strictly increasing"):
            tables.check_ids("t", torch.tensor(unsorted), unique_sorted=True)
    tables.check_ids("t", torch.tensor([2, 1, 1]))  # order is only checked when asked


def test_check_rows():
    ids = torch.tensor([1, 2])
    tables.check_rows("t", ids, torch.zeros(2, 3), 3)
    for bad in (torch.zeros(2, 4), torch.zeros(3, 3), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(6)):
        with pytest.raises(tables.TableRowsError, match=r"fp32\[2, 3\]"):
            tables.check_rows("t", ids, bad, 3)
    with pytest.raises(tables.TableRowsError, match="non-finite"):
        tables.check_rows("t", ids, torch.tensor([[0.0, math.nan, 0], [0, 0, 0]]), 3)
