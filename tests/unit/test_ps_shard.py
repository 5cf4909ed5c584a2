"""The Adam shard and its consistency gate, without sockets: golden numerics against torch."""

import math
import threading
import time

import pytest
import torch

from shardps.proto import codec, common_pb2, ps_pb2
from shardps.proto.codec import finite
from shardps.server.ps import schedule
from shardps.server.ps.errors import (
    InvalidConfigError,
    InvalidPushError,
    ShardClosedError,
    StepAheadError,
    UnknownWorkerError,
)
from shardps.server.ps.shard import Shard
from shardps.server.ps.updater import Updater, fused_adam_available
from tests.harness import poll

N = 1000
FUSED = fused_adam_available()  # the shard's Adam is torch's fused kernel where there is one
SYNC, SSP, ASYNC = common_pb2.CONSISTENCY_SYNC, common_pb2.CONSISTENCY_SSP, common_pb2.CONSISTENCY_ASYNC
APPLIED, ACCEPTED = ps_pb2.PUSH_STATUS_APPLIED, ps_pb2.PUSH_STATUS_ACCEPTED
DUPLICATE, STALE, JOB_DONE = ps_pb2.PUSH_STATUS_DUPLICATE, ps_pb2.PUSH_STATUS_STALE, ps_pb2.PUSH_STATUS_JOB_DONE


def make_config(mode=ASYNC, workers=("w0",), staleness=0, length=N, **opt) -> ps_pb2.ShardConfig:
    optimizer = dict(name="adam", lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
    optimizer.update(opt)
    return ps_pb2.ShardConfig(
        job_id="job", shard_index=0, offset=0, length=length, total=length,
        optimizer=common_pb2.OptimizerConfig(**optimizer), mode=mode, staleness=staleness,
        workers=list(workers), epoch=1)


def make_shard(init: torch.Tensor, **kw) -> Shard:
    return Shard(make_config(length=init.numel(), **kw), init.clone())


def torch_reference(init: torch.Tensor, cfg: ps_pb2.ShardConfig, fused: bool):
    param = init.clone().requires_grad_(True)
    opt = cfg.optimizer
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return param, cls([param], lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                      weight_decay=opt.weight_decay, fused=fused)


def weights(shard: Shard) -> torch.Tensor:
    """The shard's fp32 weights, as a checkpoint copies them."""
    return shard.capture().tensors["weights"]


def wait_for_version(shard: Shard, version: int, timeout: float) -> bool:
    return shard.wait_for_pull(version, -math.inf, timeout)


def wait_for_clock(shard: Shard, clock: int, timeout: float) -> bool:
    return shard.wait_for_pull(0, clock, timeout)


def push(shard, grad, worker="w0", step=0, **kw):
    """Pushes a copy: the shard takes over (and may reuse) the tensor it is given."""
    return shard.push(grad.clone(), worker_id=worker, step=step, **kw)


def weighted_mean_in_rank_order(grads, sizes):
    total = sum(sizes)
    out = grads[0] * (sizes[0] / total)
    for g, b in zip(grads[1:], sizes[1:], strict=True):
        out.add_(g, alpha=b / total)
    return out


def test_this_torch_has_fused_cpu_adam_and_the_shard_uses_it():
    assert fused_adam_available()
    assert Updater(make_config().optimizer, torch.zeros(N)).fused is True


OPTIMIZERS = {
    "adam": dict(name="adam"),
    "adam_l2": dict(name="adam", weight_decay=0.1),
    "adamw": dict(name="adamw", weight_decay=0.05),
    "warmup": dict(name="adam", schedule="linear_warmup", warmup_steps=5),
    "cosine": dict(name="adamw", weight_decay=0.01, schedule="cosine", warmup_steps=3,
                   total_steps=12, min_lr=0.001),
}


@pytest.mark.parametrize("mode", [ASYNC, SYNC])
@pytest.mark.parametrize("opt", OPTIMIZERS.values(), ids=list(OPTIMIZERS))
def test_weights_equal_torch_adam_bitwise(opt, mode):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(N, generator=gen)
    shard = make_shard(init, mode=mode, **opt)
    param, reference = torch_reference(init, shard.config, FUSED)
    for k in range(15):
        grad = torch.randn(N, generator=gen) * (k + 1)
        result = push(shard, grad, step=k, base_version=k)
        assert (result.status, result.version) == (APPLIED, k + 1)
        for group in reference.param_groups:  # what a torch LR scheduler would set
            group["lr"] = schedule.learning_rate(shard.config.optimizer, k)
        param.grad = grad
        reference.step()
    assert torch.equal(weights(shard), param.detach())
    state = shard.capture().tensors
    assert torch.equal(state["exp_avg"], reference.state[param]["exp_avg"])
    assert torch.equal(state["exp_avg_sq"], reference.state[param]["exp_avg_sq"])
    assert shard.adam_step == 15 and shard.pushes_applied == 15


def test_schedule_lr_is_taken_at_the_adam_step_not_one_later():
    # The cosine golden above passes only if step k uses lr(k); check it would catch lr(k+1).
    cfg = make_config(schedule="linear_warmup", warmup_steps=10)
    init, grad = torch.ones(N), torch.full((N,), 0.5)
    shard = Shard(cfg, init.clone())
    push(shard, grad)
    param, reference = torch_reference(init, cfg, FUSED)
    reference.param_groups[0]["lr"] = schedule.learning_rate(cfg.optimizer, 1)
    param.grad = grad
    reference.step()
    assert not torch.equal(weights(shard), param.detach())


def test_sync_round_is_batch_weighted_mean_in_rank_order_then_one_step():
    gen = torch.Generator().manual_seed(1)
    workers, sizes = ["w0", "w1", "w2"], [7, 13, 3]
    init = torch.randn(N, generator=gen)
    shard = make_shard(init, mode=SYNC, workers=workers)
    grads = [torch.randn(N, generator=gen) for _ in workers]
    # Arrival order differs from rank order.
    for rank, expected in [(2, ACCEPTED), (0, ACCEPTED), (1, APPLIED)]:
        result = push(shard, grads[rank], worker=workers[rank], batch_size=sizes[rank])
        assert result.status == expected
        assert result.version == (1 if expected == APPLIED else 0)
    assert shard.adam_step == 1 and shard.pushes_applied == 3

    mean = weighted_mean_in_rank_order(grads, sizes)
    exact = sum(g.double() * b for g, b in zip(grads, sizes, strict=True)) / sum(sizes)
    assert torch.allclose(mean.double(), exact, atol=1e-6)
    arrival = weighted_mean_in_rank_order([grads[i] for i in (2, 0, 1)], [sizes[i] for i in (2, 0, 1)])
    assert not torch.equal(mean, arrival), "rank order must be observable for this test to bite"

    param, reference = torch_reference(init, shard.config, FUSED)
    param.grad = mean
    reference.step()
    assert torch.equal(weights(shard), param.detach())


def test_sync_worker_without_samples_counts_in_the_round_but_not_in_the_mean():
    gen = torch.Generator().manual_seed(6)
    init, grad = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    shard = make_shard(init, mode=SYNC, workers=["w0", "w1", "w2"])
    assert push(shard, torch.zeros(N), worker="w0", batch_size=0).status == ACCEPTED
    assert push(shard, grad, worker="w1", batch_size=4).status == ACCEPTED
    assert push(shard, torch.zeros(N), worker="w2", batch_size=0).status == APPLIED
    param, reference = torch_reference(init, shard.config, FUSED)
    param.grad = grad
    reference.step()
    assert torch.equal(weights(shard), param.detach())
    # Nobody had samples: the round still closes, on the plain mean.
    for worker in ("w0", "w1", "w2"):
        push(shard, torch.full((N,), 3.0), worker=worker, step=1, batch_size=0)
    assert shard.version == 2


def test_sync_step_ahead_and_stale_and_duplicate():
    shard = make_shard(torch.zeros(N), mode=SYNC, workers=["w0", "w1"])
    grad = torch.ones(N)
    with pytest.raises(StepAheadError):
        push(shard, grad, worker="w0", step=1)
    assert push(shard, grad, worker="w0", step=0).status == ACCEPTED
    assert push(shard, grad, worker="w0", step=0).status == DUPLICATE
    # A restarted w0 (new incarnation) cannot add a second contribution to the round.
    assert push(shard, grad, worker="w0", step=0, incarnation=1).status == DUPLICATE
    assert push(shard, grad, worker="w1", step=0).status == APPLIED
    before = weights(shard)
    assert push(shard, grad, worker="w1", step=0).status == DUPLICATE
    assert push(shard, grad, worker="w1", step=0, incarnation=2).status == STALE
    assert shard.version == 1 and torch.equal(weights(shard), before)


def test_async_duplicates_change_nothing_and_incarnations_are_separate():
    shard = make_shard(torch.zeros(N), workers=["w0"])
    assert push(shard, torch.ones(N), step=3).status == APPLIED
    before = weights(shard)
    for step in (3, 2, 0):
        result = push(shard, torch.ones(N), step=step)
        assert (result.status, result.version) == (DUPLICATE, 1)
    assert torch.equal(weights(shard), before)
    assert push(shard, torch.ones(N), step=0, incarnation=1).status == APPLIED
    assert shard.version == 2 and shard.info().worker_clocks["w0"] == 4


def test_async_staleness_is_version_minus_base_version():
    shard = make_shard(torch.zeros(N), workers=["w0", "w1"])
    assert push(shard, torch.ones(N), worker="w0", step=0, base_version=0).staleness == 0
    assert push(shard, torch.ones(N), worker="w0", step=1, base_version=1).staleness == 0
    assert push(shard, torch.ones(N), worker="w1", step=0, base_version=0).staleness == 2


def wait_in_thread(shard, fn):
    """Runs fn in a thread until it blocks inside the shard; returns (thread, results list)."""
    results = []
    thread = threading.Thread(target=lambda: results.append(fn()), daemon=True)
    thread.start()
    poll(lambda: shard.waiting_pulls == 1 or results, 10, interval=0.01, what="a waiting pull")
    assert not results, "returned before it was woken"
    return thread, results


def test_ssp_pull_waits_for_the_slowest_live_worker():
    shard = make_shard(torch.zeros(N), mode=SSP, workers=["w0", "w1"], staleness=1)
    for step in range(3):
        assert push(shard, torch.ones(N), worker="w0", step=step).status == APPLIED
    # Clock 3 needs every clock >= 2; w1 has pushed nothing.
    assert wait_for_clock(shard, 1, timeout=0)
    assert not wait_for_clock(shard, 3, timeout=0.05)
    start = time.monotonic()
    thread, results = wait_in_thread(shard, lambda: wait_for_clock(shard, 3, timeout=30))
    push(shard, torch.ones(N), worker="w1", step=0)
    assert not wait_for_clock(shard, 3, timeout=0)
    push(shard, torch.ones(N), worker="w1", step=1)
    thread.join(10)
    assert results == [True] and time.monotonic() - start < 10
    assert shard.version == 5  # ssp applies every push on arrival
    # The server's own record of the bound: clock 1 was granted with w1 at 0 and clock 3
    # with w1 at 2 (spread 1 both times); the refused clock-3 pulls are not counted.
    assert shard.info().max_clock_spread == 1
    assert wait_for_clock(shard, 3, timeout=0) and shard.info().max_clock_spread == 1


def test_ssp_gate_opens_when_the_slow_worker_leaves():
    shard = make_shard(torch.zeros(N), mode=SSP, workers=["w0", "w1"], staleness=0)
    push(shard, torch.ones(N), worker="w0", step=0)
    thread, results = wait_in_thread(shard, lambda: wait_for_clock(shard, 1, timeout=30))
    shard.update_workers(["w0"], epoch=2)
    thread.join(10)
    assert results == [True]


def test_shrinking_the_live_set_completes_the_open_round():
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(N, generator=gen)
    shard = make_shard(init, mode=SYNC, workers=["w0", "w1", "w2"])
    g0, g2 = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    push(shard, g2, worker="w2", batch_size=5)
    push(shard, g0, worker="w0", batch_size=3)
    thread, results = wait_in_thread(shard, lambda: wait_for_version(shard, 1, timeout=30))
    assert not shard.update_workers(["w0", "w1"], epoch=0)  # older epoch: ignored
    assert shard.workers == ["w0", "w1", "w2"]
    assert shard.update_workers(["w0", "w2"], epoch=2)
    thread.join(10)
    assert results == [True] and shard.version == 1
    info = shard.info()
    assert info.short_rounds == 1  # opened with 3 live workers, closed with 2
    assert (list(info.live_workers), info.epoch) == (["w0", "w2"], 2)
    param, reference = torch_reference(init, shard.config, FUSED)
    param.grad = weighted_mean_in_rank_order([g0, g2], [3, 5])
    reference.step()
    assert torch.equal(weights(shard), param.detach())
    with pytest.raises(UnknownWorkerError):
        push(shard, g0, worker="w1", step=1)


def test_contribution_of_a_worker_that_left_is_dropped():
    init = torch.zeros(N)
    shard = make_shard(init, mode=SYNC, workers=["w0", "w1", "w2"])
    push(shard, torch.full((N,), 100.0), worker="w1")
    push(shard, torch.ones(N), worker="w0")
    assert shard.update_workers(["w0", "w2"], epoch=2) is False  # w2 still owes its push
    assert push(shard, torch.ones(N), worker="w2").status == APPLIED
    assert shard.info().short_rounds == 1  # w1's push was dropped: 2 of 3 contributed
    assert push(shard, torch.ones(N), worker="w0", step=1).status == ACCEPTED
    assert push(shard, torch.ones(N), worker="w2", step=1).status == APPLIED
    assert shard.info().short_rounds == 1  # round 1 opened with the 2 workers left
    single = make_shard(init, mode=SYNC, workers=["w0"])
    push(single, torch.ones(N), worker="w0")
    push(single, torch.ones(N), worker="w0", step=1)
    assert torch.equal(weights(shard), weights(single))  # w1's 100s were not averaged in


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient_is_rejected_with_state_unchanged(bad):
    shard = make_shard(torch.ones(N), mode=SYNC, workers=["w0"])
    grad = torch.ones(N)
    grad[N // 2] = bad
    info = shard.info()
    with pytest.raises(InvalidPushError) as err:
        push(shard, grad)
    assert err.value.reason == "non_finite"
    assert shard.info() == info and torch.equal(weights(shard), torch.ones(N))
    assert push(shard, torch.ones(N)).status == APPLIED  # not taken for a duplicate


def test_finite_check_is_not_fooled_by_an_overflowing_sum():
    assert finite(torch.full((1000,), 3e38))
    assert not finite(torch.tensor([1.0, float("nan"), 2.0]))
    assert not finite(torch.tensor([float("inf"), float("-inf")]))


def test_bad_pushes_raise_before_any_change():
    shard = make_shard(torch.ones(N), mode=SYNC, workers=["w0"])
    with pytest.raises(InvalidPushError):
        push(shard, torch.ones(N + 1))
    with pytest.raises(UnknownWorkerError):
        push(shard, torch.ones(N), worker="intruder")
    with pytest.raises(InvalidPushError):
        push(shard, torch.ones(N), batch_size=-1)
    with pytest.raises(InvalidPushError):
        push(shard, torch.ones(N), step=-1)
    assert shard.version == 0 and shard.info().worker_clocks == {}


def test_frozen_shard_refuses_pushes_keeps_weights_and_wakes_pulls():
    shard = make_shard(torch.ones(N), mode=SYNC, workers=["w0", "w1"])
    push(shard, torch.ones(N), worker="w0")  # an open round that never completes
    thread, results = wait_in_thread(shard, lambda: wait_for_version(shard, 1, timeout=30))
    start = time.monotonic()
    assert shard.set_job_state(common_pb2.JOB_STATE_CONVERGED)
    thread.join(10)
    assert results == [False] and time.monotonic() - start < 10
    assert push(shard, torch.ones(N), worker="w1").status == JOB_DONE
    assert shard.check_push(worker_id="w1", step=0, length=N) == JOB_DONE
    assert not shard.set_job_state(common_pb2.JOB_STATE_RUNNING)  # final is final
    assert shard.frozen and shard.version == 0
    snap = shard.snapshot()
    assert snap.job_done and torch.equal(snap.tensor, torch.ones(N))
    shard.release(snap)


def test_snapshot_is_consistent_while_pushes_apply():
    shard = make_shard(torch.zeros(N))
    first = shard.snapshot(torch.float32)
    again = shard.snapshot(torch.float32)
    assert again.tensor is first.tensor  # one copy per version, shared
    push(shard, torch.ones(N))
    after = shard.snapshot(torch.float32)
    assert (first.version, after.version) == (0, 1)
    assert torch.equal(first.tensor, torch.zeros(N))  # not torn by the apply
    assert torch.equal(after.tensor, weights(shard))
    half = shard.snapshot(torch.bfloat16)
    assert half.tensor.dtype == torch.bfloat16
    assert torch.equal(half.tensor, weights(shard).to(torch.bfloat16))
    for snap in (first, again, after, half):
        shard.release(snap)


def test_closed_shard_ends_waits_and_refuses_calls():
    shard = make_shard(torch.zeros(N))
    thread, results = wait_in_thread(shard, lambda: wait_for_version(shard, 5, timeout=30))
    shard.close()
    thread.join(10)
    assert results == [False]
    with pytest.raises(ShardClosedError):
        push(shard, torch.ones(N))
    with pytest.raises(ShardClosedError):
        shard.snapshot()


@pytest.mark.parametrize("change", [
    dict(job_id=""), dict(length=0), dict(total=N - 1), dict(mode=0), dict(staleness=-1),
    dict(workers=["a", "a"]), dict(offset=-1),
])
def test_bad_configs_are_rejected(change):
    cfg = make_config()
    for key, value in change.items():
        if key == "workers":
            del cfg.workers[:]
            cfg.workers.extend(value)
        else:
            setattr(cfg, key, value)
    with pytest.raises(InvalidConfigError):
        Shard(cfg, torch.zeros(cfg.length if cfg.length > 0 else 1))


def test_initial_weights_must_be_finite_fp32_of_the_length():
    with pytest.raises(InvalidConfigError):
        Shard(make_config(), torch.full((N,), float("nan")))
    with pytest.raises(InvalidConfigError):
        Shard(make_config(), torch.zeros(N, dtype=torch.float64))
    with pytest.raises(InvalidConfigError):
        Shard(make_config(), torch.zeros(N + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gradient_that_would_overflow_adams_state_is_rejected_with_state_unchanged(dtype):
    """3e38 is finite, its square is not: Adam's second moment would be inf for good."""
    shard = make_shard(torch.ones(N), mode=ASYNC, workers=["w0"])
    grad = torch.ones(N)
    grad[:100] = 3e38
    info = shard.info()
    with pytest.raises(InvalidPushError, match="Adam's state would overflow") as err:
        push(shard, grad.to(dtype))
    assert err.value.reason == "too_large"
    assert shard.info() == info and torch.equal(weights(shard), torch.ones(N))
    # At the bound it applies, every moment stays finite and every weight keeps moving.
    grad[:100] = -codec.MAX_GRADIENT
    assert push(shard, grad.to(dtype)).status == APPLIED
    state = shard.capture().tensors
    assert torch.isfinite(state["exp_avg_sq"]).all() and torch.isfinite(state["exp_avg"]).all()
    moved = weights(shard).clone()
    assert push(shard, torch.ones(N).to(dtype), step=1).status == APPLIED
    assert torch.isfinite(weights(shard)).all() and bool((weights(shard) != moved).all())


def test_sync_mean_of_gradients_at_the_bound_keeps_adams_state_finite():
    shard = make_shard(torch.ones(N), mode=SYNC, workers=["w0", "w1"])
    push(shard, torch.full((N,), codec.MAX_GRADIENT), worker="w0", batch_size=1)
    assert push(shard, torch.full((N,), codec.MAX_GRADIENT), worker="w1", batch_size=7).status == APPLIED
    assert torch.isfinite(shard.capture().tensors["exp_avg_sq"]).all()


@pytest.mark.parametrize("field, value, message", [
    ("eps", 1e-50, "optimizer.eps must be in"),  # fp32 rounds it to 0: 0/0 = NaN
    ("eps", 0.0, "optimizer.eps must be in"),
    ("lr", 1e39, "optimizer.lr must be in"),
    ("weight_decay", 1e300, "optimizer.weight_decay must be in"),
])
def test_optimizer_settings_that_cannot_keep_adams_state_finite_are_refused(field, value, message):
    with pytest.raises(InvalidConfigError, match=message):
        schedule.validate(make_config(**{field: value}).optimizer)
