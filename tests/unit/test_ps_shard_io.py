"""How a shard takes gradients in and gives weights out: wire-dtype staging applied block by
block (bitwise the fp32 path), and pulls that read the weights in place, copied on write."""

import threading

import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.server.ps import adam as adam_lib
from shardps.server.ps.shard import Shard

N = 3 * adam_lib.BLOCK_ELEMENTS + 12_345  # several blocks and a ragged tail
SYNC, ASYNC = common_pb2.CONSISTENCY_SYNC, common_pb2.CONSISTENCY_ASYNC
APPLIED = ps_pb2.PUSH_STATUS_APPLIED


def make_shard(init: torch.Tensor, mode=ASYNC, workers=("w0",), name="adam", weight_decay=0.0) -> Shard:
    return Shard(ps_pb2.ShardConfig(
        job_id="job", shard_index=0, offset=0, length=init.numel(), total=init.numel(),
        optimizer=common_pb2.OptimizerConfig(name=name, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                                             weight_decay=weight_decay),
        mode=mode, workers=list(workers), epoch=1), init.clone())


def staged(shard: Shard, grad: torch.Tensor) -> torch.Tensor:
    """What the servicer does: a staging buffer of the wire dtype, filled with the push."""
    return shard.staging(grad.dtype).copy_(grad)


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_a_push_kept_in_its_wire_dtype_equals_pushing_it_decoded_to_fp32(wire, name):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(N, generator=gen)
    half, full = make_shard(init, name=name, weight_decay=0.01), make_shard(init, name=name, weight_decay=0.01)
    for step in range(3):
        grad = torch.randn(N, generator=gen).to(wire)
        assert half.push(staged(half, grad), worker_id="w0", step=step, checked=True).status == APPLIED
        full.push(staged(full, grad.float()), worker_id="w0", step=step)
    a, b = half.capture().tensors, full.capture().tensors
    assert torch.equal(a["weights"], b["weights"])
    assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16])
def test_a_sync_round_is_the_weighted_mean_in_rank_order_block_by_block(wire):
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(N, generator=gen)
    shard = make_shard(init, mode=SYNC, workers=("w0", "w1", "w2"))
    grads = [torch.randn(N, generator=gen).to(wire) for _ in range(3)]
    sizes = [5, 3, 8]
    for worker, grad, size in zip(("w2", "w0", "w1"), (grads[2], grads[0], grads[1]), (8, 5, 3), strict=True):
        result = shard.push(staged(shard, grad), worker_id=worker, step=0, batch_size=size)
    assert result.status == APPLIED and shard.version == 1
    # The reference: the whole-vector mean in rank order, then torch's fused Adam.
    mean = grads[0].float().mul_(sizes[0] / 16)
    for grad, size in zip(grads[1:], sizes[1:], strict=True):
        mean.add_(grad.float(), alpha=size / 16)
    param = init.clone()
    reference = torch.optim.Adam([param], lr=0.01, betas=(0.9, 0.999), eps=1e-8, fused=True)
    param.grad = mean
    reference.step()
    assert torch.equal(shard.capture().tensors["weights"], param)


def chunks(shard: Shard, snap, step: int = 100_000) -> torch.Tensor:
    return torch.cat([shard.read(snap, lo, min(lo + step, shard.length), lambda v: v.float().clone())
                      for lo in range(0, shard.length, step)])


def test_a_pull_reads_in_place_and_a_step_copies_the_weights_only_for_pulls_still_reading():
    shard = make_shard(torch.zeros(N))
    idle = shard.snapshot()
    shard.release(idle)
    shard.push(staged(shard, torch.ones(N)), worker_id="w0", step=0)
    assert idle._entry.tensor is None  # released before the step: nothing was copied

    held = shard.snapshot()
    half = shard.snapshot(torch.bfloat16)
    before = shard.capture().tensors["weights"]
    first = shard.read(held, 0, 10, lambda v: v.clone())
    shard.push(staged(shard, torch.ones(N)), worker_id="w0", step=1)  # applies while both are held
    assert held._entry.tensor is not None and half._entry.tensor.dtype == torch.bfloat16
    assert torch.equal(first, before[:10])
    assert torch.equal(chunks(shard, held), before)  # not torn by the step
    assert torch.equal(chunks(shard, half), before.to(torch.bfloat16).float())
    current = shard.snapshot()
    assert current.version == 2 and torch.equal(chunks(shard, current), shard.capture().tensors["weights"])
    for snap in (held, half, current):
        shard.release(snap)


def test_concurrent_reads_never_see_a_half_applied_step():
    shard = make_shard(torch.zeros(N))
    torn: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            snap = shard.snapshot()
            values = chunks(shard, snap, step=50_000)
            shard.release(snap)
            if not bool((values == values[0]).all()):  # every step moves all elements alike
                torn.append(snap.version)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(20):
            shard.push(staged(shard, torch.ones(N)), worker_id="w0", step=step)
    finally:
        stop.set()
        thread.join(30)
    assert not torn and shard.version == 20
