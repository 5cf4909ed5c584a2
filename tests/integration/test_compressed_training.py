"""transport.compress on real daemons: a sync digits job whose pushes are int8 with error
feedback reaches the same accuracy target as fp32 in about the same steps, with about a
quarter of fp32's push bytes, as the workers' wire metrics count them;
top-k does too with an uncompressed warm-up and frozen-variance Adam on the servers, and sign
when each worker compresses its own momentum of the gradient preconditioned by the servers'
frozen denominator (optimizer.worker_momentum); the daemons are bitwise the one-process job."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
import torch

from shardps.client.api import ClientError
from shardps.proto import common_pb2, compress
from shardps.server.ps.updater import Updater
from shardps.worker import tasks
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from shardps.worker.feedback import ErrorFeedback
from shardps.worker.models import build_model
from shardps.worker.momentum import WorkerMomentum
from tests.cluster import Cluster
from tests.integration.test_semantics import job_spec

TARGET = 0.93
EVERY = 5


def _per_step(c: Cluster, job_id: str, direction: str) -> float:
    """Payload bytes per pushed step, summed over the workers' metrics."""
    sent = sum(w.metrics.wire_bytes.labels(job=job_id, direction=direction)._value.get()
               for w in c.workers)
    steps = sum(w.metrics.steps.labels(job=job_id)._value.get() for w in c.workers)
    assert steps > 0
    return sent / steps


def _run(c: Cluster, compress: str, compress_pull: str = "none", warmup: int = 0,
         precondition: bool = False, momentum: bool = False) -> tuple[common_pb2.JobState, int, str]:
    spec = job_spec("sync", workers=2, servers=2,
                    optimizer={"lr": 0.003, "freeze_variance_after": warmup,
                               "precondition_pushes": precondition, "worker_momentum": momentum},
                    transport={"compress": compress, "compress_pull": compress_pull,
                               "compress_warmup_steps": warmup},
                    stop={"max_steps": 400, "eval_every": EVERY,
                          "target": {"metric": "accuracy", "value": TARGET}})
    job = c.wait(c.submit(spec), timeout=240)
    assert job.state == common_pb2.JOB_STATE_CONVERGED, job.reason
    assert job.best_metric >= TARGET
    return job.state, job.best_step, job.job_id


@pytest.fixture(scope="module")
def cluster():
    """One cluster for every job of this module (each test's jobs are its own)."""
    c = Cluster(servers=2, workers=2)
    yield c
    c.close()


@pytest.fixture(scope="module")
def fp32(cluster: Cluster) -> tuple[int, str]:
    """The uncompressed run every compressor is held against: (steps to TARGET, job id)."""
    _, steps, job = _run(cluster, "none")
    return steps, job


def test_int8_with_error_feedback_converges_like_fp32_with_a_quarter_of_the_push_bytes(cluster, fp32):
    c, (fp32_steps, fp32_job) = cluster, fp32
    _, int8_steps, int8_job = _run(c, "int8")
    fp32_push, int8_push = _per_step(c, fp32_job, "push"), _per_step(c, int8_job, "push")
    ratio = int8_push / fp32_push
    print(f"sync digits, 2 workers, 2 servers: accuracy {TARGET} at step {fp32_steps} (fp32), "
          f"{int8_steps} (int8+EF); push bytes per step {fp32_push:.0f} vs {int8_push:.0f} "
          f"({ratio:.4f}); pull {_per_step(c, int8_job, 'pull'):.0f}")
    # Same target within 1.1x the steps (and one evaluation interval: targets are seen there).
    assert int8_steps <= 1.1 * fp32_steps + EVERY
    # int8 at block 256: n codes + a 4-byte scale per 256 + a 16-byte header per shard.
    assert 0.25 <= ratio <= 0.26
    # Pulls stay fp32 (a step's pulls: the weights once, plus the final evaluation's).
    assert abs(_per_step(c, int8_job, "pull") / _per_step(c, fp32_job, "pull") - 1) < 0.05
    for w in c.workers:
        assert 3.8 <= w.metrics.compression_ratio.labels(job=int8_job)._value.get() <= 4.0
        assert w.metrics.compression_ratio.labels(job=fp32_job)._value.get() == 1.0


def test_int8_both_ways_converges_like_fp32_with_about_a_quarter_of_the_bytes(cluster, fp32):
    c, (fp32_steps, fp32_job) = cluster, fp32
    _, both_steps, both_job = _run(c, "int8", "int8")
    ratios = {d: _per_step(c, both_job, d) / _per_step(c, fp32_job, d) for d in ("push", "pull")}
    print(f"sync digits, int8 pushes and pulls with error feedback: accuracy {TARGET} at "
          f"step {both_steps} (fp32 {fp32_steps}); bytes vs fp32 {ratios}")
    assert both_steps <= 1.1 * fp32_steps + EVERY
    assert 0.25 <= ratios["push"] <= 0.26
    # Each worker's first pull of each shard is dense; every later one an int8 delta.
    assert 0.25 <= ratios["pull"] <= 0.30


WARMUP = 10  # uncompressed steps, then frozen variance (docs/network.md, "Top-k and sign under Adam")


def _steps(c: Cluster, job_id: str) -> float:
    return sum(w.metrics.steps.labels(job=job_id)._value.get() for w in c.workers) / len(c.workers)


# Sign under frozen-variance Adam alone never reached 0.93 in 400 steps; with preconditioned
# pushes of g / D it still does not on this model (fp32 reaches it at step 90), and the daemons
# are not at fault: they are bitwise the one-process job (the last tests here), which does not
# reach it in 400 steps either. Here g / D is heavy-tailed and grows after the freeze (mean
# |g / D| 1.0 at step 10, 3-18 by step 30; max 19, then 10^2-10^3), so a sign block's one
# scale fits few of its elements (cos(decode, input) 0.58 falling to 0.2) and the residuals
# grow to 5-16x the push; smaller blocks, other floors, clipping and longer warm-ups did not
# fix it (docs/network.md, "Preconditioned pushes"). What does: each worker compresses its own
# momentum of g / D (optimizer.worker_momentum, 1-bit Adam's choice) and the servers step
# without momentum: 80 steps (fp32 90). The preconditioned case stays as the contrast.
@pytest.mark.parametrize("setting, codec, scheme", [
    ("topk:0.1", compress.TopK(0.1), "frozen"),
    ("sign", compress.Sign(4096), "worker_momentum"),
    pytest.param("sign", compress.Sign(4096), "preconditioned", marks=pytest.mark.xfail(
        strict=True, reason="sign pushes of g / D do not reach the target on this model "
                            "(see comment); the worker's momentum does")),
])
def test_a_compressor_under_frozen_variance_reaches_the_target_within_1_1x_the_steps_of_fp32(
        cluster, fp32, setting, codec, scheme):
    c, (fp32_steps, fp32_job) = cluster, fp32
    _, steps, job = _run(c, setting, warmup=WARMUP, precondition=scheme != "frozen",
                         momentum=scheme == "worker_momentum")
    fp32_push, push = _per_step(c, fp32_job, "push"), _per_step(c, job, "push")
    # What the encodings weigh: each shard's part encoded, after WARMUP dense steps.
    encoded = sum(codec.size(s.length) for s in c.job(job).shard_map.shards)
    pushed = _steps(c, job)
    expected = (WARMUP * fp32_push + (pushed - WARMUP) * encoded) / pushed
    print(f"sync digits, {setting} with EF after {WARMUP} dense steps, frozen variance, "
          f"{scheme}: accuracy {TARGET} at step {steps} (fp32 {fp32_steps}); push bytes per "
          f"step {push:.0f} vs {fp32_push:.0f} ({push / fp32_push:.4f}; {encoded} once warm)")
    assert steps <= 1.1 * fp32_steps + EVERY
    assert abs(push / expected - 1) < 0.02
    assert push < 0.5 * fp32_push


# Sign pull deltas need small blocks here: sign:4096 took 110 steps, sign:512 155, sign:128
# 100, sign:32 75 (docs/network.md, "Compressed pulls"). A run is deterministic on one
# machine, not across CPUs: int8 pulls took 90 steps on an Intel VM and 105 on an AMD one
# (sign:32 75 on both), so bench.net's fastest setting, sign:32, is held to the 1.1x
# and int8 pulls only to converging within 1.25x.
@pytest.mark.parametrize("pull, within", [("int8", 1.25), ("sign:32", 1.1)])
def test_sign_pushes_of_the_workers_momentum_with_compressed_pulls_reach_the_target(
        cluster, fp32, pull, within):
    """bench.net's fastest settings: sign pushes (worker momentum) with int8 or sign pull
    deltas reach the target within `within` x fp32's steps, at a fraction of its bytes both
    ways."""
    c, (fp32_steps, fp32_job) = cluster, fp32
    _, steps, job = _run(c, "sign", pull, warmup=WARMUP, precondition=True, momentum=True)
    ratios = {d: _per_step(c, job, d) / _per_step(c, fp32_job, d) for d in ("push", "pull")}
    print(f"sync digits, sign pushes (worker momentum, W = {WARMUP}) and {pull} pull deltas: "
          f"accuracy {TARGET} at step {steps} (fp32 {fp32_steps}); bytes vs fp32 {ratios}")
    assert steps <= within * fp32_steps + EVERY
    assert ratios["push"] < 0.2 and ratios["pull"] < (0.3 if pull == "int8" else 0.1)


def one_process(spec: dict, shards: list[tuple[int, int]], steps: int,
                each: Callable[[int, torch.nn.Module], bool] | None = None,
                ) -> dict[str, torch.Tensor]:
    """A sync job with preconditioned compressed pushes, trained in this process as the daemons
    train it: each worker's slice of the global batch, its own error feedback per shard on
    g / D (D read from the servers' Updater once frozen), the round's batch-weighted mean
    stepped by the servers' own Updater per shard. With optimizer.worker_momentum each worker
    compresses its own momentum (worker/momentum.py) instead of g / D. `each(step, model)`,
    called with the weights pulled for every step: True stops there."""
    data = load_dataset(spec["data"]["dataset"], {}, spec["seed"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"]["name"], spec["model"]["kwargs"], data.info)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    opt, transport = spec["optimizer"], spec["transport"]
    on_momentum = opt.get("worker_momentum", False)
    config = common_pb2.OptimizerConfig(
        name="adam", lr=opt["lr"], beta1=0.9, beta2=0.999, eps=1e-8,
        freeze_variance_after=opt["freeze_variance_after"], precondition_pushes=True,
        worker_momentum=on_momentum)
    servers = [Updater(config, flat[o : o + n].clone()) for o, n in shards]
    workers, warmup = spec["cluster"]["workers"], transport["compress_warmup_steps"]
    feedback = [ErrorFeedback(compress.parse(transport["compress"])) for _ in range(workers)]
    warm_codec = transport.get("compress_warmup", "none")  # the warm-up's own encoding and residuals
    warm = [ErrorFeedback(compress.parse(warm_codec)) if warm_codec != "none" else None for _ in range(workers)]
    momenta = [WorkerMomentum(config.beta1) for _ in range(workers)]
    order = BatchOrder(data.num_train, spec["data"]["batch_size"], spec["data"]["shuffle"],
                       spec["seed"])
    denominators: list[torch.Tensor] = []
    for step in range(steps):
        torch.nn.utils.vector_to_parameters(torch.cat([s.weights for s in servers]), params)
        if each is not None and each(step, model):
            break
        if step == warmup:
            denominators = [s.preconditioner() for s in servers]
        pushes = []
        for rank, (ef, mw) in enumerate(zip(feedback, momenta, strict=True)):
            index = order.slice(step, rank, workers)
            model.zero_grad()
            tasks.loss(data.task, model(data.train_x[index]), data.train_y[index]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
            parts = [grad[o : o + n] for o, n in shards]
            if step < warmup and on_momentum:
                for i, g in enumerate(parts):
                    mw.warm(f"shard{i}", g)
            if denominators:
                parts = [mw.step(f"shard{i}", g, d) if on_momentum else g / d
                         for i, (g, d) in enumerate(zip(parts, denominators, strict=True))]
                parts = [compress.decode(ef.compress(f"shard{i}", u)) for i, u in enumerate(parts)]
            elif warm[rank] is not None:
                parts = [compress.decode(warm[rank].compress(f"shard{i}", g)) for i, g in enumerate(parts)]
            pushes.append(parts)
        for i, server in enumerate(servers):
            server.step([(push[i], 1 / workers) for push in pushes], opt["lr"])
    torch.nn.utils.vector_to_parameters(torch.cat([s.weights for s in servers]), params)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("momentum, warmup_codec", [(False, "none"), (True, "none"), (True, "int8")],
                         ids=["g_over_D", "worker_momentum", "worker_momentum_int8_warmup"])
def test_sign_with_preconditioned_pushes_on_daemons_is_the_one_process_job_bitwise(cluster, momentum,
                                                                                   warmup_codec):
    """The daemons compute exactly what one process computes (the xfail above is the scheme's,
    not the wiring's): each worker's D, read once at step WARMUP, its own residuals (and with
    optimizer.worker_momentum its own momentum, from step 0; with transport.compress_warmup
    the warm-up's encoding and residuals), the servers' mean of two workers' decoded pushes
    and the frozen step, bit for bit."""
    steps = WARMUP + 15
    spec = job_spec("sync", workers=2, servers=2,
                    optimizer={"lr": 0.003, "freeze_variance_after": WARMUP,
                               "precondition_pushes": True, "worker_momentum": momentum},
                    transport={"compress": "sign", "compress_warmup_steps": WARMUP,
                               "compress_warmup": warmup_codec},
                    stop={"max_steps": steps, "eval_every": 1000})
    job = cluster.wait(cluster.submit(spec), timeout=120)
    assert job.state == common_pb2.JOB_STATE_COMPLETED, job.reason
    weights, versions = cluster.client.export(job.job_id)
    assert versions == [steps, steps]
    shards = [(s.offset, s.length) for s in job.shard_map.shards]
    expected = one_process(spec, shards, steps)
    untouched = one_process(spec, shards, WARMUP)  # so the comparison can fail
    assert any(not torch.equal(weights[k], untouched[k]) for k in weights)
    # ... and the two schemes differ, so it fails if the setting did not reach the daemons.
    other = one_process({**spec, "optimizer": {**spec["optimizer"], "worker_momentum": not momentum}}
                        if warmup_codec == "none" else
                        {**spec, "transport": {**spec["transport"], "compress_warmup": "none"}}, shards, steps)
    assert any(not torch.equal(weights[k], other[k]) for k in weights)
    assert all(torch.equal(weights[k], expected[k]) for k in expected), \
        max(float((weights[k] - expected[k]).abs().max()) for k in expected)


def test_worker_momentum_without_preconditioned_pushes_is_refused_at_submit(cluster):
    """A bad combination is refused by the coordinator, naming the field, and makes no job."""
    before = len(cluster.client.jobs())
    spec = job_spec("sync", workers=2, servers=2,
                    optimizer={"freeze_variance_after": WARMUP, "worker_momentum": True},
                    transport={"compress": "sign", "compress_warmup_steps": WARMUP},
                    stop={"max_steps": 20})
    with pytest.raises(ClientError) as info:
        cluster.submit(spec)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "optimizer.worker_momentum: needs optimizer.precondition_pushes: true" in str(info.value)
    assert len(cluster.client.jobs()) == before
