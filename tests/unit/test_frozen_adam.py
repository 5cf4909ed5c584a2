"""server/ps/frozen_adam.py through the shard's Updater: plain Adam (bitwise torch.optim) for
the warm-up, then v frozen and the step linear in the gradient; checkpoints resume frozen."""

import math

import pytest
import torch

from shardps.proto import common_pb2
from shardps.server.ps import adam as adam_lib
from shardps.server.ps import frozen_adam, schedule
from shardps.server.ps.errors import InvalidConfigError
from shardps.server.ps.updater import Updater

N = 5000
W = 3


def config(**kw) -> common_pb2.OptimizerConfig:
    return common_pb2.OptimizerConfig(**{"name": "adam", "lr": 0.01, "beta1": 0.9, "beta2": 0.99,
                                         "eps": 1e-8, "freeze_variance_after": W, **kw})


def grads(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=gen) * torch.linspace(0.01, 1, N) for _ in range(n)]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_warm_up_is_plain_adam_then_v_stays_and_the_step_follows_the_formula(name):
    opt = config(name=name, weight_decay=0.1)
    weights = torch.randn(N, generator=torch.Generator().manual_seed(9))
    ours = Updater(opt, weights.clone())
    param = weights.clone()
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    ref = cls([param], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=True)
    gs = grads(W + 2)
    for g in gs[:W]:
        ours.step([(g.clone(), None)], 0.01)
        param.grad = g.clone()
        ref.step()
    assert torch.equal(ours.weights, param)  # the warm-up is Adam, bitwise
    v = ours.copy_tensors()["exp_avg_sq"]
    m = ours.copy_tensors()["exp_avg"]
    expected = ours.weights.clone()
    for t, g in enumerate(gs[W:], start=W + 1):
        ours.step([(g.clone(), None)], 0.01)
        g = g + 0.1 * expected if name == "adam" else g
        if name == "adamw":
            expected.mul_(1 - 0.01 * 0.1)
        m = 0.9 * m + 0.1 * g
        denom = (v.sqrt() / math.sqrt(1 - 0.99**W))
        denom = denom.clamp(min=frozen_adam.FLOOR * denom.mean().item()) + 1e-8
        expected -= 0.01 / (1 - 0.9**t) * m / denom
    state = ours.copy_tensors()
    assert torch.equal(state["exp_avg_sq"], v)  # frozen
    assert int(state["step"]) == W + 2
    torch.testing.assert_close(ours.weights, expected, rtol=1e-5, atol=1e-7)


def test_after_the_freeze_the_update_is_linear_in_the_gradient():
    # What error feedback needs: two pushes' worth in one step moves the weights by the sum.
    opt = config(beta1=0.0)
    a, b = Updater(opt, torch.zeros(N)), Updater(opt, torch.zeros(N))
    for g in grads(W, seed=1):
        a.step([(g.clone(), None)], 0.01)
        b.step([(g.clone(), None)], 0.01)
    start = a.weights.clone()
    g1, g2 = grads(2, seed=2)
    a.step([(g1, 0.5), (g2, 0.5)], 0.01)  # a sync round's mean
    b.step([(g1.clone(), None)], 0.01)
    moved_b1 = b.weights - start
    b.weights.copy_(start)
    b.step([(g2.clone(), None)], 0.01)
    torch.testing.assert_close(a.weights - start, 0.5 * (moved_b1 + (b.weights - start)),
                               rtol=1e-5, atol=1e-8)


def test_a_restored_shard_resumes_frozen_exactly():
    opt = config()
    gs = grads(W + 4, seed=3)
    whole = Updater(opt, torch.zeros(N))
    for g in gs:
        whole.step([(g.clone(), None)], 0.01)
    first = Updater(opt, torch.zeros(N))
    for g in gs[: W + 1]:
        first.step([(g.clone(), None)], 0.01)
    restored = Updater(opt, torch.ones(N))
    saved = first.copy_tensors()
    restored.check(saved)
    restored.load(saved)
    for g in gs[W + 1:]:
        restored.step([(g.clone(), None)], 0.01)
    assert torch.equal(restored.weights, whole.weights)


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("saved_at", [W - 1, W + 1])
def test_a_frozen_shard_restored_over_its_own_frozen_state_continues_as_the_straight_run(
        precondition, saved_at):
    """The frozen denominator is computed once and kept (the Updater's cache): a restore must
    drop it. The shard restored here had frozen on other gradients, so it held another D; the
    checkpoint is from before the freeze (W - 1: it freezes again on the replayed steps) or
    after it (W + 1: D comes from the restored v)."""
    opt = config(precondition_pushes=precondition)
    gs = grads(W + 5, seed=7)
    straight, first = Updater(opt, torch.zeros(N)), Updater(opt, torch.zeros(N))
    for g in gs:
        straight.step([(g.clone(), None)], 0.01)
    for g in gs[:saved_at]:
        first.step([(g.clone(), None)], 0.01)
    saved = first.copy_tensors()
    restored = Updater(opt, torch.zeros(N))
    for g in grads(W + 2, seed=8):  # frozen on other gradients: a D of its own, cached
        restored.step([(g.clone(), None)], 0.01)
    restored.check(saved)
    restored.load(saved)
    for g in gs[saved_at:]:
        restored.step([(g.clone(), None)], 0.01)
    assert torch.equal(restored.weights, straight.weights)
    assert all(torch.equal(restored.copy_tensors()[k], straight.copy_tensors()[k])
               for k in ("exp_avg", "exp_avg_sq", "step"))
    if precondition:
        assert torch.equal(restored.preconditioner(), straight.preconditioner())


@pytest.mark.parametrize("kind", [{}, {"precondition_pushes": True},
                                  {"precondition_pushes": True, "worker_momentum": True}],
                         ids=["frozen", "preconditioned", "worker_momentum"])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_a_frozen_step_taken_block_by_block_is_bitwise_the_whole_vector_step(kind, name, monkeypatch):
    """The Updater steps a frozen shard block by block (no whole gradient formed): with blocks
    of 1024 (the last one short) it must give the bits of one block over the whole shard, as
    whole-vector ops do; through the freeze, on a round's mean (two terms, weighted) and on a
    bf16 push, with weight decay."""
    opt = config(name=name, weight_decay=0.1, **kind)

    def run(block: int) -> Updater:
        monkeypatch.setattr(adam_lib, "BLOCK_ELEMENTS", block)
        ours = Updater(opt, torch.randn(N, generator=torch.Generator().manual_seed(11)))
        for i, g in enumerate(grads(W + 4, seed=12)):
            if i < W + 2:
                ours.step([(g.clone(), 0.5), ((g * 0.3).clone(), 0.5)], 0.01)
            else:
                ours.step([(g.to(torch.bfloat16), None)], 0.01)
        return ours

    assert N % 1024
    blocks, whole = run(1024).copy_tensors(), run(N).copy_tensors()
    assert blocks.keys() == whole.keys() and all(torch.equal(blocks[k], whole[k]) for k in whole)


def test_without_the_setting_nothing_freezes():
    ours = Updater(config(freeze_variance_after=0), torch.zeros(N))
    for g in grads(W + 2, seed=4):
        before = ours.copy_tensors().get("exp_avg_sq")
        ours.step([(g.clone(), None)], 0.01)
        if before is not None:
            assert not torch.equal(ours.copy_tensors()["exp_avg_sq"], before)


def test_a_negative_freeze_is_refused_naming_the_field():
    with pytest.raises(InvalidConfigError, match="optimizer.freeze_variance_after"):
        schedule.validate(config(freeze_variance_after=-1))
