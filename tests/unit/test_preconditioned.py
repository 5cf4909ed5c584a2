"""server/ps/preconditioned.py through the shard's Updater: once frozen, a push of g / D (D what
`preconditioner` hands the workers) moves the weights as frozen-variance Adam moves them on g
with D as its denominator; the denominator is refused before the freeze and to jobs that do
not precondition; checkpoints resume exactly."""

import pytest
import torch

from shardps.server.ps import frozen_adam, preconditioned, schedule
from shardps.server.ps.errors import InvalidConfigError
from shardps.server.ps.updater import Updater
from tests.unit.test_frozen_adam import N, W, config, grads


def _warm(opt, seed: int = 0) -> Updater:
    ours = Updater(opt, torch.randn(N, generator=torch.Generator().manual_seed(9)))
    for g in grads(W, seed=seed):
        ours.step([(g.clone(), None)], 0.01)
    return ours


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_a_push_of_g_over_d_steps_as_frozen_adam_on_g(name, monkeypatch):
    pre = _warm(config(name=name, weight_decay=0.1, precondition_pushes=True))
    # frozen_adam on g with the preconditioned floor: the same update, D moved to the worker.
    monkeypatch.setattr(frozen_adam, "FLOOR", preconditioned.FLOOR)
    plain = _warm(config(name=name, weight_decay=0.1))
    assert torch.equal(pre.weights, plain.weights)
    d = pre.preconditioner()
    assert d.shape == (N,) and bool((d > 0).all())
    for g in grads(3, seed=5):
        pre.step([((g / d).clone(), 0.5), ((g / d).clone(), 0.5)], 0.01)  # a round's mean
        plain.step([(g.clone(), None)], 0.01)
    torch.testing.assert_close(pre.weights, plain.weights, rtol=1e-5, atol=1e-7)
    assert torch.equal(pre.copy_tensors()["exp_avg_sq"], plain.copy_tensors()["exp_avg_sq"])
    assert torch.equal(pre.preconditioner(), d)  # frozen: every worker reads the same D


def test_the_denominator_is_refused_before_the_freeze_and_without_the_setting():
    ours = Updater(config(precondition_pushes=True), torch.zeros(N))
    with pytest.raises(InvalidConfigError, match="not frozen yet"):
        ours.preconditioner()
    for g in grads(W - 1):
        ours.step([(g.clone(), None)], 0.01)
    with pytest.raises(InvalidConfigError, match="not frozen yet"):
        ours.preconditioner()
    with pytest.raises(InvalidConfigError, match="precondition_pushes"):
        _warm(config()).preconditioner()


def test_a_restored_shard_resumes_preconditioned_exactly():
    opt = config(precondition_pushes=True)
    whole, first = _warm(opt), _warm(opt)
    pushes = [g / whole.preconditioner() for g in grads(4, seed=6)]
    for u in pushes:
        whole.step([(u.clone(), None)], 0.01)
    first.step([(pushes[0].clone(), None)], 0.01)
    restored = Updater(opt, torch.ones(N))
    restored.load(first.copy_tensors())
    assert torch.equal(restored.preconditioner(), first.preconditioner())
    for u in pushes[1:]:
        restored.step([(u.clone(), None)], 0.01)
    assert torch.equal(restored.weights, whole.weights)


def test_preconditioning_without_a_freeze_is_refused_naming_the_field():
    with pytest.raises(InvalidConfigError, match="optimizer.precondition_pushes"):
        schedule.validate(config(freeze_variance_after=0, precondition_pushes=True))
