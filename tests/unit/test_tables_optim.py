"""server/ps/table_optim.py: lazy Adam against torch.optim.SparseAdam, row-wise Adagrad against
a plain reference, and the sync combination of workers' row gradients."""

import math

import pytest
import torch

from shardps.server.ps.table_optim import LazyAdam, RowGrads, RowwiseAdagrad, combine, make_optimizer

N, DIM = 50, 6


def _sparse_steps(seed: int, steps: int, n: int = N):
    """Uncoalesced sparse gradients with duplicate ids (as nn.Embedding(sparse=True) makes)."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        k = 0 if step == 3 else int(torch.randint(1, 30, (), generator=gen))  # one empty step
        idx = torch.randint(0, n, (k,), generator=gen)
        values = torch.randn(k, DIM, generator=gen)
        yield torch.sparse_coo_tensor(idx[None], values, (n, DIM), check_invariants=True)


def _apply(opt, weights, state, grad: torch.Tensor, lr=None):
    grad = grad.coalesce()
    opt.step(weights, state, grad.indices()[0], grad.values(), lr)


@pytest.mark.parametrize("maximize", [False, True])
def test_lazy_adam_is_sparse_adam_bitwise(maximize):
    init = torch.randn(N, DIM, generator=torch.Generator().manual_seed(1))
    param = torch.nn.Parameter(init.clone())
    ref = torch.optim.SparseAdam([param], lr=0.05, betas=(0.8, 0.95), eps=1e-6, maximize=maximize)
    opt = LazyAdam(lr=0.05, betas=(0.8, 0.95), eps=1e-6, maximize=maximize)
    weights = init.clone()
    state = {k: torch.zeros(N, *shape) for k, shape in opt.state_shapes(DIM).items()}
    for step, grad in enumerate(_sparse_steps(0, 12)):
        lr = 0.05 / (1 + step)  # a schedule, set before the step as a server does
        ref.param_groups[0]["lr"] = lr
        param.grad = grad
        ref.step()
        _apply(opt, weights, state, grad, lr)
        assert torch.equal(weights, param.detach()), step
        assert opt.steps == ref.state[param]["step"] == step + 1
    assert torch.equal(state["exp_avg"], ref.state[param]["exp_avg"])
    assert torch.equal(state["exp_avg_sq"], ref.state[param]["exp_avg_sq"])
    # rows never touched kept their value and zero moments
    touched = torch.zeros(N, dtype=torch.bool)
    for grad in _sparse_steps(0, 12):
        touched[grad.coalesce().indices()[0]] = True
    assert torch.equal(weights[~touched], init[~touched])
    assert state["exp_avg"][~touched].eq(0).all()


def test_lazy_adam_counts_an_empty_step():
    opt = LazyAdam()
    weights = torch.ones(3, 2)
    state = {k: torch.zeros(3, *s) for k, s in opt.state_shapes(2).items()}
    opt.step(weights, state, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2))
    assert opt.steps == 1 and weights.eq(1).all()


def _adagrad_reference(weights, acc, steps, lr, eps, wd):
    """Row-wise Adagrad, one row at a time in plain torch (FBGEMM's EXACT_ROWWISE_ADAGRAD)."""
    weights, acc = weights.clone(), acc.clone()
    for grad in steps:
        grad = grad.coalesce()
        for i, g in zip(grad.indices()[0].tolist(), grad.values(), strict=True):
            g = g + wd * weights[i]
            acc[i] += (g * g).mean()
            weights[i] -= lr / (acc[i].sqrt() + eps) * g
    return weights, acc


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_rowwise_adagrad_matches_its_reference(wd):
    init = torch.randn(N, DIM, generator=torch.Generator().manual_seed(2))
    opt = RowwiseAdagrad(lr=0.1, eps=1e-8, weight_decay=wd, initial_accumulator_value=0.1)
    weights = init.clone()
    state = {"sum": torch.full((N,), 0.1)}
    assert opt.state_shapes(DIM) == {"sum": ()} and opt.state_bytes_per_row(DIM) == 4
    grads = list(_sparse_steps(3, 10))
    for grad in grads:
        _apply(opt, weights, state, grad)
    ref_w, ref_acc = _adagrad_reference(init, torch.full((N,), 0.1), grads, 0.1, 1e-8, wd)
    torch.testing.assert_close(weights, ref_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(state["sum"], ref_acc, rtol=0, atol=1e-6)


def test_hyper_round_trips_with_the_step_count():
    for opt in (LazyAdam(lr=0.01, betas=(0.5, 0.6), eps=1e-5, maximize=True),
                RowwiseAdagrad(lr=0.2, eps=1e-7, weight_decay=0.1, initial_accumulator_value=0.3)):
        opt.steps = 17
        again = make_optimizer(opt.hyper())
        assert type(again) is type(opt) and again.hyper() == opt.hyper()
    with pytest.raises(ValueError, match="unknown"):
        make_optimizer({"name": "sgd", "lr": 1, "steps": 0})


def test_bad_hyper_parameters_are_refused():
    for make in (lambda: LazyAdam(lr=0), lambda: LazyAdam(betas=(1.0, 0.9)), lambda: LazyAdam(eps=0),
                 lambda: RowwiseAdagrad(lr=math.nan), lambda: RowwiseAdagrad(weight_decay=-1)):
        with pytest.raises(ValueError):
            make()


def _dense(ids, grads, n=N):
    out = torch.zeros(n, DIM)
    out[ids] = grads
    return out


def test_combine_weights_like_the_dense_shards():
    gen = torch.Generator().manual_seed(4)
    parts = []
    for batch in (5, 3, 0, 2):
        ids = torch.randperm(N, generator=gen)[:12].sort().values
        parts.append(RowGrads(ids, torch.randn(12, DIM, generator=gen), batch))
    ids, grads = combine(parts)
    assert torch.equal(ids, torch.unique(torch.cat([p.ids for p in parts if p.batch_size])))
    expected = sum(_dense(p.ids, p.grads) * (p.batch_size / 10) for p in parts)
    torch.testing.assert_close(_dense(ids, grads), expected, rtol=0, atol=1e-6)


def test_combine_uses_a_lone_contribution_as_is():
    part = RowGrads(torch.tensor([1, 4]), torch.randn(2, DIM), 7)
    ids, grads = combine([part, RowGrads(torch.tensor([2]), torch.randn(1, DIM), 0)])
    assert ids is part.ids and grads is part.grads


def test_combine_without_samples_is_a_plain_mean():
    a = RowGrads(torch.tensor([1]), torch.ones(1, DIM), 0)
    b = RowGrads(torch.tensor([1, 3]), torch.full((2, DIM), 3.0), 0)
    ids, grads = combine([a, b])
    assert ids.tolist() == [1, 3] and grads[:, 0].tolist() == [2.0, 1.5]
    with pytest.raises(ValueError):
        combine([])
