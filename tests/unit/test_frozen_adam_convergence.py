"""Top-k and sign pushes with error feedback under the servers' own Adam (the shard's Updater,
so frozen-variance Adam as server/ps/frozen_adam.py runs it): steps to a target against fp32,
with an uncompressed warm-up of WARMUP steps and the variance frozen after it.

One process stands in for a sync job: 2 workers, each its own minibatch (a fixed generator,
so every run is deterministic), its own error feedback per shard; the servers' 2 shards step
once on the mean of the decoded pushes, as a sync round does. Digits (accuracy) with full
batches too; a small transformer on `text` (perplexity). Bytes per step are averaged over the
whole run, warm-up included, against fp32's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch

from shardps.proto import common_pb2, compress
from shardps.server.ps.updater import Updater
from shardps.worker import tasks
from shardps.worker.datasets import Dataset, digits, text
from shardps.worker.feedback import ErrorFeedback
from shardps.worker.models import transformer
from shardps.worker.momentum import WorkerMomentum

WARMUP = 10  # uncompressed steps; the servers freeze Adam's variance after as many


@dataclass(frozen=True)
class Setup:
    """One convergence problem: the data, a model factory, the batch (None: full batch), lr,
    the target and whether it is a perplexity (lower is better) or an accuracy."""

    data: Dataset
    model: str
    batch: int | None
    lr: float
    target: float
    max_steps: int


@dataclass(frozen=True)
class Outcome:
    steps: int  # the first step at which the target was met (max_steps + 1: never)
    bytes_ratio: float  # push bytes per step over the run, against fp32's


def _model(setup: Setup) -> torch.nn.Module:
    torch.manual_seed(0)
    if setup.model == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return transformer(setup.data.info, d_model=32, n_layers=1, n_heads=2)


def _met(setup: Setup, model: torch.nn.Module) -> bool:
    data = setup.data
    with torch.no_grad():
        if data.task == "classification":
            return (model(data.test_x).argmax(1) == data.test_y).float().mean().item() >= setup.target
        return math.exp(tasks.loss(data.task, model(data.test_x[:64]), data.test_y[:64]).item()) <= setup.target


def _gradient(setup: Setup, model: torch.nn.Module, params: list[torch.Tensor],
              gen: torch.Generator) -> torch.Tensor:
    data = setup.data
    if setup.batch is None:
        x, y = data.train_x, data.train_y
    else:
        index = torch.randint(0, data.num_train, (setup.batch,), generator=gen)
        x, y = data.train_x[index], data.train_y[index]
    model.zero_grad()
    tasks.loss(data.task, model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]


def run(setup: Setup, comp: compress.Compressor | None, error_feedback: bool = True,
        warmup: int = WARMUP, workers: int = 2, max_steps: int | None = None,
        precondition: bool = False, order: int = 0, momentum: bool = False,
        warmup_comp: compress.Compressor | None = None) -> Outcome:
    """Trains until the target is met or max_steps (default: the setup's) have run.
    `precondition`: after the warm-up the workers push g / D (optimizer.precondition_pushes),
    D each shard's own frozen denominator as GetPreconditioner reads it. `momentum` (with
    `precondition`): each worker pushes its own momentum of g / D instead
    (optimizer.worker_momentum, worker/momentum.py). `order` seeds the minibatches.
    `warmup_comp`: the warm-up's pushes go through this compressor with their own error
    feedback instead of dense (transport.compress_warmup)."""
    max_steps = max_steps or setup.max_steps
    model = _model(setup)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    shards = [(0, flat.numel() // 2), (flat.numel() // 2, flat.numel() - flat.numel() // 2)]
    config = common_pb2.OptimizerConfig(name="adam", lr=setup.lr, beta1=0.9, beta2=0.999, eps=1e-8,
                                        freeze_variance_after=warmup if comp else 0,
                                        precondition_pushes=precondition, worker_momentum=momentum)
    servers = [Updater(config, flat[o : o + n].clone()) for o, n in shards]
    feedback = [ErrorFeedback(comp, error_feedback) if comp else None for _ in range(workers)]
    warm_feedback = [ErrorFeedback(warmup_comp) if warmup_comp else None for _ in range(workers)]
    momenta = [WorkerMomentum(config.beta1) if momentum else None for _ in range(workers)]
    gen = torch.Generator().manual_seed(order)
    scales = [torch.ones(n) for _, n in shards]  # what each worker divides a shard's slice by
    sent = 0
    for step in range(max_steps + 1):
        torch.nn.utils.vector_to_parameters(torch.cat([s.weights for s in servers]), params)
        if step and _met(setup, model):
            return Outcome(step, sent / step / (4 * flat.numel() * workers))
        if precondition and step == warmup:
            scales = [server.preconditioner() for server in servers]
        pushes = []
        for ef, mw, wf in zip(feedback, momenta, warm_feedback, strict=True):
            grad = _gradient(setup, model, params, gen)
            parts = [grad[o : o + n] for o, n in shards]
            if ef is None or step < warmup:
                for i, g in enumerate(parts if mw is not None else []):
                    mw.warm(f"shard{i}", g)  # type: ignore[union-attr]
                if wf is None:
                    sent += 4 * grad.numel()
                    pushes.append(parts)
                    continue
                ef = wf
            else:
                parts = [mw.step(f"shard{i}", g, scales[i]) if mw is not None else g / scales[i]
                         for i, g in enumerate(parts)]
            encoded = [ef.compress(f"shard{i}", u) for i, u in enumerate(parts)]
            sent += sum(map(len, encoded))
            pushes.append([compress.decode(e) for e in encoded])
        for i, server in enumerate(servers):
            server.step([(push[i], 1 / workers) for push in pushes], setup.lr)
        if step == max_steps:
            break
    return Outcome(max_steps + 1, sent / max_steps / (4 * flat.numel() * workers))


DIGITS = digits(0)
SETUPS = {
    "digits-full-batch": Setup(DIGITS, "mlp", None, 0.01, 0.95, 300),
    "digits-minibatch": Setup(DIGITS, "mlp", 64, 0.003, 0.93, 400),
}


@pytest.fixture(scope="module", params=list(SETUPS))
def setup_and_fp32(request) -> tuple[Setup, Outcome]:
    setup = SETUPS[request.param]
    fp32 = run(setup, None)
    assert fp32.steps <= setup.max_steps // 3, "the baseline itself no longer reaches the target quickly"
    return setup, fp32


# Top-k 20% as well: the ratio that meets the text target below. Measured: full batch 27
# (fp32 28), minibatches 50 (fp32 63); without EF slower in each.
@pytest.mark.parametrize("ratio", [0.1, 0.2])
def test_topk_with_error_feedback_and_frozen_variance_reaches_the_target_within_1_1x(
        setup_and_fp32, ratio):
    setup, fp32 = setup_and_fp32
    with_ef = run(setup, compress.TopK(ratio))
    print(f"fp32 {fp32.steps}, top-k {ratio:.0%} + EF {with_ef.steps} "
          f"({with_ef.bytes_ratio:.3f} of the bytes)")
    assert with_ef.steps <= 1.1 * fp32.steps
    # Honest bytes: the warm-up is dense, the rest 8 bytes (index, value) per kept element.
    assert with_ef.bytes_ratio < 0.3 + 2 * ratio
    # Contrast: the same scheme without error feedback is slower.
    assert run(setup, compress.TopK(ratio), error_feedback=False).steps > with_ef.steps


def test_sign_with_error_feedback_and_frozen_variance_within_1_1x_on_full_batches():
    setup = SETUPS["digits-full-batch"]
    fp32 = run(setup, None)
    assert run(setup, compress.Sign(4096), max_steps=int(1.1 * fp32.steps)).steps <= 1.1 * fp32.steps


# With minibatches sign does not meet it on plain gradients: 72 steps (fp32 63), 89 without EF;
# one scale per 4096-element block flattens coordinates whose gradients differ by orders of
# magnitude. Preconditioned pushes (g / D, optimizer.precondition_pushes) put them on Adam's
# scale first. Measured on three batch orders (fp32 63, 71, 59): sign 55, 63, 45 (without EF
# 79, 84, 71); top-k 10% 57, 55, 50 (without EF 61, 56, 65).
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("comp", [compress.Sign(4096), compress.TopK(0.1)], ids=["sign", "topk"])
def test_preconditioned_pushes_with_error_feedback_within_1_1x_on_minibatches(comp, order):
    setup = SETUPS["digits-minibatch"]
    fp32 = run(setup, None, order=order)
    with_ef = run(setup, comp, precondition=True, order=order, max_steps=int(1.1 * fp32.steps))
    print(f"order {order}: fp32 {fp32.steps}, {comp.name} + EF, preconditioned {with_ef.steps}")
    assert with_ef.steps <= 1.1 * fp32.steps
    if comp.name == "sign":  # contrast: without error feedback sign is slower
        assert run(setup, comp, error_feedback=False, precondition=True, order=order).steps > with_ef.steps


# Each worker compressing its own momentum of g / D (optimizer.worker_momentum, 1-bit Adam's
# scheme) is what brings sign within 1.1x on the daemons' 128-64 MLP, where g / D alone never
# reaches the target (tests/integration/test_compressed_training.py). Here, measured: full
# batch 28 (fp32 28; without EF 47); minibatches on three orders 59, 57, 50 (fp32 63, 71, 59;
# without EF 65, 78, 69). Top-k 10% the same way: 32 full batch, 56, 55, 54.
@pytest.mark.parametrize("setup_name, order", [("digits-full-batch", 0), ("digits-minibatch", 0),
                                               ("digits-minibatch", 1), ("digits-minibatch", 2)])
def test_sign_pushes_of_the_workers_momentum_within_1_1x(setup_name, order):
    setup = SETUPS[setup_name]
    fp32 = run(setup, None, order=order)
    limit = int(1.1 * fp32.steps)
    with_ef = run(setup, compress.Sign(4096), precondition=True, momentum=True, order=order,
                  max_steps=limit)
    print(f"{setup_name}, order {order}: fp32 {fp32.steps}, sign + EF on the workers' momentum "
          f"{with_ef.steps} ({with_ef.bytes_ratio:.3f} of the bytes)")
    assert with_ef.steps <= limit
    without = run(setup, compress.Sign(4096), error_feedback=False, precondition=True,
                  momentum=True, order=order)
    assert without.steps > with_ef.steps  # contrast: error feedback is what makes it


def test_preconditioned_pushes_within_1_1x_on_full_batches():
    setup = SETUPS["digits-full-batch"]
    fp32 = run(setup, None)  # 28 steps; measured: sign 28, top-k 10% 27
    limit = int(1.1 * fp32.steps)
    for comp in (compress.Sign(4096), compress.TopK(0.1)):
        assert run(setup, comp, precondition=True, max_steps=limit).steps <= limit


TEXT = Setup(text(0, max_chars=60_000, seq_len=32), "transformer", 32, 0.01, 10.0, 200)
TEXT_ORDERS = [0, 1, 2, 3, 4]  # fp32: 80, 68, 74, 82, 57 steps to perplexity 10
# Batch order 4 is the odd one out: fp32 gets there early (57) and int8 on plain Adam's
# variance lags it, 86 with EF (without EF 67), and an int8 warm-up with it.
_ORDER_4_LAGS = pytest.mark.xfail(strict=True, reason="on batch order 4 int8 on plain Adam takes "
                                                      "86 steps against fp32's 57 (see comment)")
TEXT_ORDERS_BUT_4 = [*TEXT_ORDERS[:4], pytest.param(4, marks=_ORDER_4_LAGS)]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These models are tiny (the transformer has ~20K parameters): on a loaded 2-core machine
    torch's second thread only waits for the first, and a text run took 40-80 s instead of 2-8."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _text_fp32(order: int) -> int:
    steps = run(TEXT, None, order=order).steps
    assert steps <= TEXT.max_steps // 2, "the baseline itself no longer reaches the target quickly"
    return steps


# The text target, each compressor with error feedback within 1.1x fp32's steps on four or
# five batch orders (docs/network.md, "The text target", has the table with and without EF).
# int8 needs no warm-up and no frozen variance: it is nearly lossless, so the servers run
# plain Adam on its decode (transport.compress: int8, nothing else set). Measured: 80, 69, 68,
# 82, 86 (fp32 80, 68, 74, 82, 57); without EF 81, 71, 69, 75, 67.
@pytest.mark.parametrize("order", TEXT_ORDERS_BUT_4)
def test_int8_with_error_feedback_reaches_the_text_target_within_1_1x(order):
    fp32 = _text_fp32(order)
    limit = int(1.1 * fp32)
    with_ef = run(TEXT, compress.Int8(256), warmup=0, order=order, max_steps=limit)
    print(f"order {order}: fp32 {fp32}, int8 + EF {with_ef.steps} ({with_ef.bytes_ratio:.3f} of the bytes)")
    assert with_ef.steps <= limit
    assert with_ef.bytes_ratio < 0.26  # every push compressed: 4 + 4/256 bytes per 4 of fp32


# Sign and top-k under frozen variance need the variance frozen late on text: a transformer's
# gradient scales keep moving after the first steps (int8 pushing g / D after W = 20: 86 and
# 70 against 80 and 68). With the workers' momentum (optimizer.worker_momentum) and W = 50,
# measured: sign 87, 69, 77, 90, 58; top-k 20% 82, 70, 77, 85, 59. Shorter warm-ups miss on
# at least one order (sign W = 40: 91, 72, 81; W = 45: 91, 70, 77; top-k 20% W = 30: 85, 80,
# 75; W = 40: 91, 84, 77; top-k 30% meets it at W = 40: 83, 69, 75). This is the warm-up's
# doing more than the compressor's: without error feedback the same runs take sign 84, 71,
# 77, 83, 59 and top-k 20% 84, 69, 75, 94, 58, about as good, because only the last 8-40
# steps are compressed. The price is the dense warm-up: 0.57-0.87x fp32's push bytes over the
# run for sign, 0.75-0.91x for top-k 20% (once warm, 0.032x and 0.4x).
@pytest.mark.parametrize("order", TEXT_ORDERS)
@pytest.mark.parametrize("comp", [compress.Sign(4096), compress.TopK(0.2)], ids=["sign", "topk20"])
def test_the_workers_momentum_after_a_warmup_of_50_reaches_the_text_target_within_1_1x(comp, order):
    fp32 = _text_fp32(order)
    limit = int(1.1 * fp32)
    with_ef = run(TEXT, comp, warmup=50, precondition=True, momentum=True, order=order,
                  max_steps=limit)
    print(f"order {order}: fp32 {fp32}, {comp.name} + EF, worker momentum, W = 50 {with_ef.steps} "
          f"({with_ef.bytes_ratio:.3f} of the bytes)")
    assert with_ef.steps <= limit
    assert with_ef.bytes_ratio < 0.95  # some compressed steps were counted, warm-up included


# int8 on the text target's batch order 4 lags on plain Adam (above); on the workers' momentum
# of g / D after a dense warm-up, as sign and top-k 20% are sent, it meets the target on all
# five orders. Measured: W = 40 80, 69, 73, 84, 58; W = 50 84, 69, 73, 82, 58; W = 20 86, 70,
# 76, 86, 62 (fp32 80, 68, 74, 82, 57; limits 88, 74, 81, 90, 62); W = 10 misses (88, 151+).
@pytest.mark.parametrize("order", TEXT_ORDERS)
def test_int8_on_the_workers_momentum_after_a_warmup_of_40_reaches_the_text_target_within_1_1x(order):
    fp32 = _text_fp32(order)
    limit = int(1.1 * fp32)
    with_ef = run(TEXT, compress.Int8(256), warmup=40, precondition=True, momentum=True,
                  order=order, max_steps=limit)
    without = run(TEXT, compress.Int8(256), error_feedback=False, warmup=40, precondition=True,
                  momentum=True, order=order, max_steps=2 * fp32)
    print(f"order {order}: fp32 {fp32}, int8 + EF on the workers' momentum, W = 40 "
          f"{with_ef.steps} (without EF {without.steps}; {with_ef.bytes_ratio:.3f} of the bytes)")
    assert with_ef.steps <= limit
    # 40 dense steps, then 1 + 4/256 bytes an element (4 in fp32), each shard encoded alone.
    steps = with_ef.steps
    assert (40 + (steps - 40) * 0.25) / steps < with_ef.bytes_ratio < (40 + (steps - 40) * 0.26) / steps


# Warm-up pushes in int8 (with their own error feedback) instead of dense: the servers run
# plain Adam on them as on dense ones (int8 alone meets the target), so the warm-up costs a
# quarter of the bytes and sign then meets the target at W = 40 at 0.14-0.16x fp32's push bytes
# over the run. The job setting is transport.compress_warmup (worker/wirepush.py; the daemons
# are bitwise this scheme: test_compressed_training.py, worker_momentum_int8_warmup). Measured
# (fp32 80, 68, 74, 82, 57): sign W = 40 85, 73, 70, 85, 99, without EF after the warm-up 87,
# 76, 75, 84, 81 (and with the int8 warm-up's EF off too: 88, 75, 77, 93, 75); W = 50 86, 71,
# 69, 85, 91; W = 30 89, 87, 76; top-k 20% W = 40 87, 73, 69, 84, 94 (0.32-0.34x); top-k 10%
# W = 50 99, 73, 71. Order 4 lags as int8 alone does.
@pytest.mark.parametrize("order", TEXT_ORDERS_BUT_4)
def test_sign_after_an_int8_warmup_reaches_the_text_target_within_1_1x(order):
    fp32 = _text_fp32(order)
    limit = int(1.1 * fp32)
    sign = compress.Sign(4096)
    with_ef = run(TEXT, sign, warmup=40, precondition=True, momentum=True, order=order,
                  max_steps=limit, warmup_comp=compress.Int8(256))
    print(f"order {order}: fp32 {fp32}, sign + EF after 40 int8 steps {with_ef.steps} "
          f"({with_ef.bytes_ratio:.3f} of the bytes)")
    assert with_ef.steps <= limit
    assert with_ef.bytes_ratio < 0.2


# Top-k at 10% is not met on text by any setting measured (fp32 80, 68, 74). Frozen variance
# alone: W = 10: 121, 301+; 20: 107, 109; 30: 111, 102; 40: 106, 87, 93; 50: 110, 111, 82.
# Preconditioned g / D: W = 40: 119, 103, 95; W = 50: 105, 104, 98. On the workers' momentum:
# W = 20: 95, 91; 30: 95, 75; 40: 102, 84; 50: 94, 68, 78. Each worker's own Adam direction
# (its own v as well as m, tried in this harness only): 106 and 131 at W = 10. A dense step
# every 5 steps to refresh v: 96. Top-k needs 20% (0.4x fp32's bytes once warm), above.
@pytest.mark.xfail(strict=True, reason="top-k 10% takes 1.17x fp32's steps or more to the text "
                                       "target on batch order 0 in every setting measured")
def test_topk_10_percent_on_the_workers_momentum_reaches_the_text_target_within_1_1x():
    fp32 = _text_fp32(0)
    limit = int(1.1 * fp32)
    assert run(TEXT, compress.TopK(0.1), warmup=50, precondition=True, momentum=True,
               max_steps=limit).steps <= limit
