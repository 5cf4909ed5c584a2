"""worker/embedding.py: the table modules are torch's locally, and trained through a row source
backed by the servers' table shards (in process here) they equal torch with SparseAdam."""

import pytest
import torch
from torch import nn

from shardps.proto import tables
from shardps.proto.tables import FixedLayout, RowInit, TableIdError
from shardps.server.ps.table_config import TableConfig
from shardps.server.ps.table_optim import LazyAdam, RowGrads, RowwiseAdagrad, combine
from shardps.server.ps.table_shard import TableShard
from shardps.worker import embedding
from shardps.worker.embedding import Embedding, EmbeddingBag


class InProcessSource:
    """A row source over table shards on `num_servers` in-process "servers": ids are split
    between servers by the tables' sharding, as the wire path will split them."""

    def __init__(self, num_servers: int, make_optimizer):
        self.num_servers = num_servers
        self.make_optimizer = make_optimizer
        self.shards: dict[str, list[TableShard]] = {}
        self.fetches = 0

    def add(self, module, name: str, weight: torch.Tensor | None, **dynamic):
        n = module.num_embeddings
        shards = []
        for s in range(self.num_servers):
            config = TableConfig(name, module.embedding_dim, n, self.num_servers, s,
                                 init=module.init or RowInit(), **dynamic)
            rows = None if weight is None else weight[FixedLayout(name, n, self.num_servers).ids_on(s)].clone()
            shards.append(TableShard(config, self.make_optimizer(), rows))
        self.shards[name] = shards

    def _servers(self, name, ids):
        shard = self.shards[name][0]
        if shard.layout is not None:
            return shard.layout.place(ids)[0]
        return tables.dynamic_server_of(name, ids, self.num_servers)

    def fetch(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        self.fetches += 1
        out = torch.empty(ids.numel(), self.shards[table][0].dim)
        where = self._servers(table, ids)
        for s, shard in enumerate(self.shards[table]):
            mine = (where == s).nonzero().flatten()
            out[mine] = shard.lookup(ids[mine])
        return out

    def push(self, table: str, ids: torch.Tensor, grads: torch.Tensor):
        where = self._servers(table, ids)
        for s, shard in enumerate(self.shards[table]):
            shard.apply(ids[where == s], grads[where == s])  # every server counts the step

    def weight(self, table: str) -> torch.Tensor:
        shards = self.shards[table]
        return tables.assemble_fixed(shards[0].layout, {s: sh.rows_in_slot_order()
                                                        for s, sh in enumerate(shards)})


class Net(nn.Module):
    """Two fixed tables (an Embedding with padding, an EmbeddingBag with offsets) and dense layers."""

    def __init__(self, emb_cls, bag_cls, mode="sum"):
        super().__init__()
        self.emb = emb_cls(30, 8, padding_idx=0, sparse=True)
        self.bag = bag_cls(40, 8, mode=mode, sparse=True, padding_idx=39)
        self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
        self.mode = mode

    def forward(self, x, bag_ids, offsets, weights):
        a = self.emb(x).mean(1)
        b = self.bag(bag_ids, offsets, per_sample_weights=weights if self.mode == "sum" else None)
        return self.head(torch.cat([a, b], 1)).squeeze(1)


def _batches(steps, batch=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 12, (batch, 5), generator=gen)  # few ids: many duplicates, padding 0
        lengths = torch.randint(0, 4, (batch,), generator=gen)  # empty bags too
        bag_ids = torch.randint(30, 40, (int(lengths.sum()),), generator=gen)  # padding 39 among them
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
        weights = torch.rand(bag_ids.numel(), generator=gen)
        y = torch.randn(batch, generator=gen)
        yield x, bag_ids, offsets, weights, lengths, y


def _slice(batch, lo, hi):
    """Samples [lo, hi) of a batch (a worker's share of the global batch)."""
    x, bag_ids, offsets, weights, lengths, y = batch
    start = int(lengths[:lo].sum())
    end = start + int(lengths[lo:hi].sum())
    sub_lengths = lengths[lo:hi]
    sub_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sub_lengths.cumsum(0)[:-1]])
    return x[lo:hi], bag_ids[start:end], sub_offsets, weights[start:end], sub_lengths, y[lo:hi]


def _loss(model, batch):
    x, bag_ids, offsets, weights, _, y = batch
    return ((model(x, bag_ids, offsets, weights) - y) ** 2).mean()


def _rowwise_adagrad_reference(weight, acc, grad, lr, eps=1e-8):
    grad = grad.coalesce()
    with torch.no_grad():
        for i, g in zip(grad.indices()[0].tolist(), grad.values(), strict=True):
            acc[i] += (g * g).mean()
            weight[i] -= lr / (acc[i].sqrt() + eps) * g


def _reference(steps, mode, table_opt, worker_slices=None):
    """One process with torch's modules: SparseAdam (or the row-wise Adagrad reference) on the
    tables, Adam on the dense part."""
    torch.manual_seed(0)
    ref = Net(nn.Embedding, nn.EmbeddingBag, mode)
    tables_ = [ref.emb.weight, ref.bag.weight]
    dense = torch.optim.Adam(ref.head.parameters(), lr=0.01)
    sparse = torch.optim.SparseAdam(tables_, lr=0.05) if table_opt == "adam" else None
    acc = [torch.zeros(t.shape[0]) for t in tables_]
    for batch in _batches(steps):
        dense.zero_grad()
        for t in tables_:
            t.grad = None
        _loss(ref, batch).backward()
        dense.step()
        if sparse is not None:
            sparse.step()
        else:
            for t, a in zip(tables_, acc, strict=True):
                _rowwise_adagrad_reference(t, a, t.grad, 0.05)
    return ref


def _table_opt(kind):
    return (lambda: LazyAdam(lr=0.05)) if kind == "adam" else (lambda: RowwiseAdagrad(lr=0.05))


def _attached(num_servers, mode, table_opt):
    torch.manual_seed(0)
    model = Net(Embedding, EmbeddingBag, mode)
    source = InProcessSource(num_servers, _table_opt(table_opt))
    for name, module in embedding.table_modules(model):
        source.add(module, name, module.attach(source, name))
    return model, source


def _push(model, source):
    for name, module in embedding.table_modules(model):
        got = module.take_row_grads()
        if got is not None:
            source.push(name, *got)


@pytest.mark.parametrize("mode,table_opt,num_servers", [
    ("sum", "adam", 1), ("sum", "adam", 2), ("mean", "adam", 3), ("sum", "adagrad", 2)])
def test_training_through_a_row_source_equals_torch(mode, table_opt, num_servers):
    steps = 10
    ref = _reference(steps, mode, table_opt)
    model, source = _attached(num_servers, mode, table_opt)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in model.head.named_parameters(prefix="head")]
    dense = torch.optim.Adam(model.parameters(), lr=0.01)
    for batch in _batches(steps):
        dense.zero_grad()
        _loss(model, batch).backward()
        dense.step()
        _push(model, source)
    assert source.fetches == 2 * steps  # one fetch per table per batch
    tol = 0 if table_opt == "adam" else 1e-6
    for name in ("emb", "bag"):
        torch.testing.assert_close(source.weight(name), getattr(ref, name).weight.detach(), rtol=0, atol=tol)
    for (name, p), q in zip(model.named_parameters(), ref.head.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=tol, msg=name)
    # the padding rows never moved
    assert source.weight("emb")[0].eq(0).all() and source.weight("bag")[39].eq(0).all()


def test_sync_rounds_of_three_workers_equal_one_process_on_the_global_batch():
    steps, shares = 8, [(0, 5), (5, 8), (8, 12)]  # unequal worker batches
    ref = _reference(steps, "sum", "adam")
    model, source = _attached(2, "sum", "adam")
    dense = torch.optim.Adam(model.parameters(), lr=0.01)
    for batch in _batches(steps):
        dense_grads, table_parts = [], {"emb": [], "bag": []}
        for lo, hi in shares:  # each worker: its slice, its own mean loss (one replica suffices:
            part = _slice(batch, lo, hi)  # weights do not change within a round)
            dense.zero_grad()
            _loss(model, part).backward()
            dense_grads.append([p.grad.clone() for p in model.parameters()])
            for name, module in embedding.table_modules(model):
                ids, grads = module.take_row_grads()
                table_parts[name].append(RowGrads(ids, grads, hi - lo))
        total = sum(hi - lo for lo, hi in shares)
        for i, p in enumerate(model.parameters()):
            p.grad = sum(g[i] * ((hi - lo) / total) for g, (lo, hi) in zip(dense_grads, shares, strict=True))
        dense.step()
        for name, parts in table_parts.items():
            source.push(name, *combine(parts))
    for name in ("emb", "bag"):
        torch.testing.assert_close(source.weight(name), getattr(ref, name).weight.detach(), rtol=0, atol=1e-5)
    for p, q in zip(model.parameters(), ref.head.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_unattached_modules_are_torch_modules():
    torch.manual_seed(3)
    ref = [nn.Embedding(20, 4, padding_idx=-1, sparse=True),
           nn.EmbeddingBag(20, 4, mode="sum", include_last_offset=True, padding_idx=2)]
    torch.manual_seed(3)
    ours = [Embedding(20, 4, padding_idx=-1, sparse=True),
            EmbeddingBag(20, 4, mode="sum", include_last_offset=True, padding_idx=2)]
    for a, b in zip(ref, ours, strict=True):
        assert isinstance(b, type(a)) and b.padding_idx == a.padding_idx
        assert a.state_dict().keys() == b.state_dict().keys()
        assert torch.equal(a.weight, b.weight)
    ids = torch.tensor([[1, 19, 19], [2, 0, 1]])
    assert torch.equal(ref[0](ids), ours[0](ids))
    flat, offsets, psw = torch.tensor([1, 2, 2, 5, 7]), torch.tensor([0, 2, 2, 5]), torch.rand(5)
    assert torch.equal(ref[1](flat, offsets, psw), ours[1](flat, offsets, psw))
    # weights load from torch's state_dict with weights_only, both ways
    loaded = Embedding(20, 4)
    loaded.load_state_dict(ref[0].state_dict())
    assert torch.equal(loaded.weight, ref[0].weight)
    pretrained = Embedding.from_pretrained(ref[0].weight.detach(), freeze=False)
    assert isinstance(pretrained, Embedding)
    assert torch.equal(pretrained(ids), nn.Embedding.from_pretrained(ref[0].weight.detach())(ids))
    with pytest.raises(IndexError):
        ours[0](torch.tensor([20]))


@pytest.mark.parametrize("layout", ["2d", "last_offset", "int32"])
def test_attached_bag_forms_match_torch(layout):
    torch.manual_seed(1)
    ref = nn.EmbeddingBag(25, 3, mode="mean", include_last_offset=layout == "last_offset", padding_idx=4)
    ours = EmbeddingBag(25, 3, mode="mean", include_last_offset=layout == "last_offset", padding_idx=4)
    ours.load_state_dict(ref.state_dict())
    source = InProcessSource(2, LazyAdam)
    source.add(ours, "b", ours.attach(source, "b"))
    if layout == "2d":
        args = (torch.tensor([[4, 1, 1], [7, 24, 4]]),)
    elif layout == "last_offset":
        args = (torch.tensor([4, 1, 1, 7, 24]), torch.tensor([0, 3, 3, 5]))
    else:
        args = (torch.tensor([4, 1, 1, 7, 24], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32))
    out_ref, out = ref(*args), ours(*args)
    assert torch.equal(out, out_ref)
    (out_ref * torch.arange(out.numel()).view_as(out)).sum().backward()
    (out * torch.arange(out.numel()).view_as(out)).sum().backward()
    ids, grads = ours.take_row_grads()
    expected = ref.weight.grad.coalesce() if ref.weight.grad.is_sparse else ref.weight.grad.to_sparse()
    dense_expected = expected.to_dense()
    assert 4 not in ids.tolist()  # padding rows get no gradient, as in torch
    assert torch.equal(dense_expected[ids], grads)
    assert dense_expected[[i for i in range(25) if i not in ids.tolist()]].eq(0).all()
    assert ours.take_row_grads() is None  # taken


def test_row_grads_cover_every_forward_of_the_step():
    torch.manual_seed(0)
    ref = nn.Embedding(10, 2, sparse=True)
    ours = Embedding(10, 2, sparse=True)
    ours.load_state_dict(ref.state_dict())
    source = InProcessSource(1, LazyAdam)
    source.add(ours, "e", ours.attach(source, "e"))
    for m in (ref, ours):
        (m(torch.tensor([1, 2, 2])).sum() + 3 * m(torch.tensor([2, 9])).sum()).backward()
        m(torch.tensor([5]))  # in no backward: no gradient
    ids, grads = ours.take_row_grads()
    coalesced = ref.weight.grad.coalesce()
    assert torch.equal(ids, coalesced.indices()[0]) and torch.equal(grads, coalesced.values())
    with torch.no_grad():
        ours(torch.tensor([3]))
    assert ours.take_row_grads() is None


def test_an_all_padding_batch_still_counts_a_step():
    ours = Embedding(10, 2, padding_idx=0)
    source = InProcessSource(1, LazyAdam)
    source.add(ours, "e", ours.attach(source, "e"))
    ours(torch.tensor([0, 0])).sum().backward()
    ids, grads = ours.take_row_grads()
    assert ids.numel() == 0 and grads.shape == (0, 2)


def test_attached_fixed_table_refuses_out_of_range_ids_naming_table_and_id():
    ours = Embedding(10, 2)
    source = InProcessSource(1, LazyAdam)
    source.add(ours, "user", ours.attach(source, "user"))
    with pytest.raises(TableIdError, match=r"table 'user': id 10 is out of range \[0, 10\)"):
        ours(torch.tensor([3, 10]))
    assert source.fetches == 0
    with pytest.raises(RuntimeError, match="already attached"):
        ours.attach(source, "user")


def test_unsupported_options_are_refused_at_attach():
    source = InProcessSource(1, LazyAdam)
    with pytest.raises(NotImplementedError, match="max_norm"):
        Embedding(10, 2, max_norm=1.0).attach(source, "e")
    with pytest.raises(NotImplementedError, match="max"):
        EmbeddingBag(10, 2, mode="max").attach(source, "e")
    with pytest.raises(ValueError, match="not both"):
        Embedding(10, 2, init=RowInit(), _weight=torch.zeros(10, 2))


def test_frozen_tables_hand_back_no_gradient():
    ours = Embedding.from_pretrained(torch.randn(5, 2))  # freeze=True
    source = InProcessSource(1, LazyAdam)
    source.add(ours, "e", ours.attach(source, "e"))
    out = ours(torch.tensor([1, 2]))
    assert not out.requires_grad and ours.take_row_grads() is None


def test_a_dynamic_table_takes_any_int64_id_and_trains():
    model = nn.Sequential()
    emb = Embedding(None, 4, padding_idx=-7, init=RowInit("uniform", -0.5, 0.5))
    assert emb.weight is None and list(emb.parameters()) == [] and emb.dynamic
    with pytest.raises(RuntimeError, match="attach a row source"):
        emb(torch.tensor([1]))
    model.add_module("emb", emb)
    source = InProcessSource(2, lambda: LazyAdam(lr=0.05))
    assert emb.attach(source, "emb") is None
    source.add(emb, "emb", None)
    ids = torch.tensor([[2**62, -7, -(2**63)], [5, 5, 2**63 - 1]])
    out = emb(ids)
    assert out[0, 1].eq(0).all()  # the padding id reads as zeros...
    fresh = tables.init_rows(0, "emb", torch.tensor([5]), 4, RowInit("uniform", -0.5, 0.5))
    assert torch.equal(out[1, 0], fresh[0])
    held = sorted(x for sh in source.shards["emb"] for x in sh.export()[0].tolist())
    assert held == sorted({2**62, -(2**63), 5, 2**63 - 1})  # ...and is never created
    target = torch.ones(4)
    losses = []
    for _ in range(30):
        loss = ((emb(ids) - target) ** 2).mean()
        loss.backward()
        source.push("emb", *emb.take_row_grads())
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2


def test_dynamic_bag_with_admission_reads_zeros_until_admitted():
    bag = EmbeddingBag(None, 3, mode="sum")
    source = InProcessSource(1, LazyAdam)
    bag.attach(source, "b")
    source.add(bag, "b", None, admit_after=2, sketch_width=1 << 10)
    ids, offsets = torch.tensor([11, 12, 11]), torch.tensor([0, 2])
    assert bag(ids, offsets).eq(0).all()
    out = bag(ids, offsets)  # second sighting: admitted
    rows = tables.init_rows(0, "b", torch.tensor([11, 12]), 3, RowInit())
    torch.testing.assert_close(out, torch.stack([rows[0] + rows[1], rows[0]]), rtol=0, atol=0)


def test_table_modules_lists_tables_by_path():
    torch.manual_seed(0)
    model = Net(Embedding, EmbeddingBag)
    assert [name for name, _ in embedding.table_modules(model)] == ["emb", "bag"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_rows_land_on_the_input_device():
    torch.manual_seed(0)
    ref = nn.Embedding(10, 3, sparse=True).cuda()
    ours = Embedding(10, 3, sparse=True)
    ours.load_state_dict(ref.state_dict())
    source = InProcessSource(2, LazyAdam)
    source.add(ours, "e", ours.attach(source, "e"))
    ids = torch.tensor([[1, 2, 2], [9, 0, 1]], device="cuda")
    out = ours(ids)
    assert out.device.type == "cuda" and torch.equal(out, ref(ids))
    out.sum().backward()
    ref(ids).sum().backward()
    got_ids, grads = ours.take_row_grads()
    expected = ref.weight.grad.coalesce()
    assert torch.equal(got_ids, expected.indices()[0].cpu()) and torch.equal(grads, expected.values().cpu())
    # Both ways through the module's pinned staging buffers.
    assert ours._rows_in._buffer.is_pinned() and ours._grads_out._buffer.is_pinned()


def test_a_dynamic_table_with_ten_times_more_ids_than_its_cap_learns_within_the_cap():
    """The core of issue 12's dynamic acceptance, minus the network: ids from the whole int64
    range, 10x more distinct ids than the servers' row caps, loss falls, caps hold."""
    gen = torch.Generator().manual_seed(0)
    hot = torch.randint(-(2**63), 2**63 - 1, (60,), generator=gen)
    target = torch.randn(60, generator=gen).sign()
    torch.manual_seed(0)
    bag = EmbeddingBag(None, 4, mode="sum", init=RowInit("normal", 0.0, 0.1))
    head = nn.Linear(4, 1)
    source = InProcessSource(2, lambda: LazyAdam(lr=0.05))
    bag.attach(source, "ids")
    source.add(bag, "ids", None, max_rows=300, evict_after_steps=30)
    dense = torch.optim.Adam(head.parameters(), lr=0.01)
    losses, distinct = [], set()
    for _ in range(150):
        pick = torch.randint(0, 60, (32,), generator=gen)
        cold = torch.randint(-(2**63), 2**63 - 1, (32, 3), generator=gen)  # each seen once
        ids = torch.cat([hot[pick][:, None], cold], 1)
        distinct.update(ids.flatten().tolist())
        loss = ((head(bag(ids)).squeeze(1) - target[pick]) ** 2).mean()
        dense.zero_grad()
        loss.backward()
        dense.step()
        source.push("ids", *bag.take_row_grads())
        losses.append(loss.item())
        assert all(sh.stats().rows <= 300 for sh in source.shards["ids"])
    stats = [sh.stats() for sh in source.shards["ids"]]
    assert len(distinct) > 10 * sum(sh.row_cap for sh in source.shards["ids"])
    assert all(s.admissions > 1000 and s.evicted_cap > 1000 for s in stats)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])


@pytest.mark.parametrize("cls", ["embedding", "bag"])
def test_scale_grad_by_freq_matches_torch(cls):
    """torch has no sparse gradient with scale_grad_by_freq: the rows fetched get a dense one,
    which must equal torch's dense gradient on the rows the batch touched."""
    torch.manual_seed(2)
    if cls == "embedding":
        ref = nn.Embedding(12, 3, padding_idx=7, scale_grad_by_freq=True)
        ours = Embedding(12, 3, padding_idx=7, scale_grad_by_freq=True)
        args = (torch.tensor([[1, 1, 1, 7], [7, 2, 11, 1]]),)
    else:
        ref = nn.EmbeddingBag(12, 3, mode="mean", scale_grad_by_freq=True, padding_idx=5)
        ours = EmbeddingBag(12, 3, mode="mean", scale_grad_by_freq=True, padding_idx=5)
        args = (torch.tensor([1, 1, 1, 7, 7, 2, 11, 1]), torch.tensor([0, 3, 5]))
    ours.load_state_dict(ref.state_dict())
    source = InProcessSource(2, LazyAdam)
    source.add(ours, "t", ours.attach(source, "t"))
    for m in (ref, ours):
        out = m(*args)
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
    ids, grads = ours.take_row_grads()
    touched = sorted(set(args[0].flatten().tolist()) - {ours.padding_idx})
    assert ids.tolist() == touched
    assert torch.equal(grads, ref.weight.grad[ids])
