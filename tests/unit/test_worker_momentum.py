"""worker/momentum.py and the servers' step on it (optimizer.worker_momentum): uncompressed,
two workers' momenta step the weights as preconditioned pushes do with the servers' momentum;
the warm-up's momentum changes units once; the correction counts the worker's own steps, so a
momentum restarted mid-job (a reset, a remapped shard) pushes g / D, not a tenth of it."""

import pytest
import torch

from shardps.server.ps import schedule
from shardps.server.ps.errors import InvalidConfigError
from shardps.server.ps.updater import Updater
from shardps.worker.momentum import WorkerMomentum
from tests.unit.test_frozen_adam import N, W, config, grads

LR = 0.01


def _workers_and_server(opt) -> tuple[list[WorkerMomentum], Updater, list[list[torch.Tensor]]]:
    """Two workers and a shard through the warm-up (plain Adam on the workers' mean)."""
    server = Updater(opt, torch.randn(N, generator=torch.Generator().manual_seed(9)))
    workers = [WorkerMomentum(opt.beta1) for _ in range(2)]
    gs = [grads(W + 4, seed=s) for s in (1, 2)]
    for t in range(W):
        for worker, g in zip(workers, gs, strict=True):
            worker.warm("shard0", g[t])
        server.step([(gs[0][t].clone(), 0.5), (gs[1][t].clone(), 0.5)], LR)
    return workers, server, gs


@pytest.mark.parametrize("name, decay", [("adam", 0.0), ("adamw", 0.1)])
def test_uncompressed_worker_momenta_step_as_the_servers_momentum_of_g_over_d(name, decay):
    ours, pre = (config(name=name, weight_decay=decay, precondition_pushes=True, worker_momentum=m)
                 for m in (True, False))
    workers, server, gs = _workers_and_server(ours)
    _, reference, _ = _workers_and_server(pre)
    assert torch.equal(server.weights, reference.weights)  # the warm-up is plain Adam in both
    d = server.preconditioner()
    assert torch.equal(d, reference.preconditioner())
    for t in range(W, W + 4):
        pushes = [w.step("shard0", g[t], d) for w, g in zip(workers, gs, strict=True)]
        server.step([(pushes[0], 0.5), (pushes[1], 0.5)], LR)
        reference.step([(gs[0][t] / d, 0.5), (gs[1][t] / d, 0.5)], LR)
    torch.testing.assert_close(server.weights, reference.weights, rtol=1e-5, atol=1e-6)
    # The shard kept no momentum of its own: Adam's m is where the warm-up left it.
    _, warm, _ = _workers_and_server(ours)
    assert torch.equal(server.copy_tensors()["exp_avg"], warm.copy_tensors()["exp_avg"])


def test_l2_weight_decay_is_added_to_the_workers_mean_outside_their_momentum():
    opt = config(weight_decay=0.1, precondition_pushes=True, worker_momentum=True)
    _, server, _ = _workers_and_server(opt)
    d, before = server.preconditioner(), server.weights.clone()
    u = torch.randn(N, generator=torch.Generator().manual_seed(4))
    server.step([(u.clone(), None)], LR)
    torch.testing.assert_close(server.weights, before - LR * (u + 0.1 * before / d))


def test_the_warm_up_momentum_is_divided_by_d_once_and_the_correction_counts_its_steps():
    b1 = 0.9
    g1, g2, g3 = grads(3, seed=3)
    d = torch.rand(N, generator=torch.Generator().manual_seed(5)) + 0.5
    m = WorkerMomentum(b1)
    m.warm("shard0", g1)
    first = m.step("shard0", g2, d)
    expected = b1 * (1 - b1) * g1 / d + (1 - b1) * (g2 / d)
    torch.testing.assert_close(m.momentum("shard0"), expected)
    torch.testing.assert_close(first, expected / (1 - b1 ** 2))
    second = m.step("shard0", g3, d)
    torch.testing.assert_close(second, (b1 * expected + (1 - b1) * (g3 / d)) / (1 - b1 ** 3))


def test_a_momentum_restarted_mid_job_pushes_g_over_d_at_its_first_step():
    d = torch.full((N,), 2.0)
    g1, g2, g3 = grads(3, seed=7)
    m = WorkerMomentum(0.9)
    m.step("shard0", g1, d)
    m.step("shard0", g2, d)
    m.reset()  # a rollback: the weights were replaced, the momentum starts again
    assert m.momentum("shard0") is None
    torch.testing.assert_close(m.step("shard0", g3, d), g3 / d)
    # A remapped shard (another length) starts again too, as does a warm-up step replayed.
    short = grads(1, seed=8)[0][:100]
    torch.testing.assert_close(m.step("shard0", short, d[:100]), short / 2)
    m.warm("shard0", short)
    torch.testing.assert_close(m.step("shard0", short, d[:100]),
                               (0.09 * short / 2 + 0.1 * short / 2) / (1 - 0.81))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="beta1"):
        WorkerMomentum(1.0)
    with pytest.raises(InvalidConfigError, match="optimizer.worker_momentum"):
        schedule.validate(config(worker_momentum=True))
