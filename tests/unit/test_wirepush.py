"""worker/wirepush.py: one residual per shard, reset drops them, and the wire byte counts."""

from __future__ import annotations

import pytest
import torch

from shardps.proto import common_pb2, compress
from shardps.worker.metrics import WorkerMetrics
from shardps.worker.wirepush import WirePush

SHARDS = [common_pb2.ShardRange(index=0, offset=0, length=600),
          common_pb2.ShardRange(index=1, offset=600, length=400)]


def _wire(setting: str, dtype=common_pb2.DTYPE_FLOAT32) -> tuple[WirePush, WorkerMetrics]:
    metrics = WorkerMetrics()
    return WirePush(setting, dtype, "job", metrics), metrics


def _sent(metrics: WorkerMetrics, direction: str) -> float:
    return metrics.wire_bytes.labels(job="job", direction=direction)._value.get()


def test_uncompressed_pushes_send_elements_in_the_wire_dtype():
    wire, metrics = _wire("none", common_pb2.DTYPE_BFLOAT16)
    grad = torch.randn(1000)
    assert wire.encode(grad, SHARDS, 0) is None
    wire.pushed(grad.numel(), None)
    wire.pulled(2000)
    assert _sent(metrics, "push") == _sent(metrics, "pull") == 2000
    assert metrics.compression_ratio.labels(job="job")._value.get() == 2.0


def test_each_shard_carries_its_own_residual_and_reset_drops_them():
    wire, metrics = _wire("topk:0.1")
    grad = torch.randn(1000)
    encoded = wire.encode(grad, SHARDS, 0)
    assert encoded is not None and [compress.numel_of(e) for e in encoded] == [600, 400]
    # What each shard's encoding dropped is that shard's residual.
    for shard, data in zip(SHARDS, encoded, strict=True):
        part = grad[shard.offset : shard.offset + shard.length]
        assert wire.feedback is not None
        assert torch.equal(wire.feedback.residual(f"shard{shard.index}"),
                           part - compress.decode(data))
    # The next step sends gradient plus residual: with a zero gradient, the residual alone.
    again = wire.encode(torch.zeros(1000), SHARDS, 1)
    assert again is not None and compress.decode(again[0]).abs().sum() > 0
    wire.reset()
    after = wire.encode(torch.zeros(1000), SHARDS, 1)
    assert after is not None and all(compress.decode(e).abs().sum() == 0 for e in after)
    wire.pushed(1000, encoded)
    assert _sent(metrics, "push") == sum(map(len, encoded)) == 2 * 16 + (60 + 40) * 8
    assert metrics.compression_ratio.labels(job="job")._value.get() == 4000 / _sent(metrics, "push")


def test_the_warm_up_steps_push_uncompressed_and_leave_no_residual():
    metrics = WorkerMetrics()
    wire = WirePush("sign", common_pb2.DTYPE_FLOAT32, "job", metrics, warmup_steps=3)
    grad = torch.randn(1000)
    assert [wire.encode(grad, SHARDS, step) for step in range(3)] == [None] * 3
    assert wire.feedback is not None and wire.feedback.residual("shard0") is None
    encoded = wire.encode(grad, SHARDS, 3)
    assert encoded is not None and [compress.codec_of(e) for e in encoded] == [compress.CODEC_SIGN] * 2


def test_preconditioned_pushes_divide_by_each_shards_denominator_read_once_per_reset():
    wire = WirePush("int8", common_pb2.DTYPE_FLOAT32, "job", WorkerMetrics(), warmup_steps=2,
                    precondition=True)
    denominators = [torch.full((600,), 2.0), torch.full((400,), 0.5)]
    reads = []

    def fetch() -> list[torch.Tensor]:
        reads.append(1)
        return denominators

    grad = torch.randn(1000)
    assert wire.encode(grad, SHARDS, 1, fetch) is None and not reads  # the warm-up: no D yet
    encoded = wire.encode(grad, SHARDS, 2, fetch)
    assert encoded is not None and len(reads) == 1
    expected = [grad[:600] / 2.0, grad[600:] / 0.5]
    for data, want in zip(encoded, expected, strict=True):
        torch.testing.assert_close(compress.decode(data), want, atol=0.05, rtol=0.02)
    wire.encode(grad, SHARDS, 3, fetch)
    assert len(reads) == 1  # read once
    wire.reset()  # a rollback: a restored shard may hold another D
    wire.encode(grad, SHARDS, 4, fetch)
    assert len(reads) == 2


def test_worker_momentum_runs_through_the_warm_up_and_a_reset_drops_it():
    wire = WirePush("int8", common_pb2.DTYPE_FLOAT32, "job", WorkerMetrics(), warmup_steps=1,
                    precondition=True, momentum_beta1=0.9)
    assert wire.momentum is not None
    denominators = [torch.full((600,), 2.0), torch.full((400,), 0.5)]
    g0, g1 = torch.randn(1000), torch.randn(1000)
    assert wire.encode(g0, SHARDS, 0, lambda: denominators) is None  # warm-up: uncompressed ...
    torch.testing.assert_close(wire.momentum.momentum("shard1"), 0.1 * g0[600:])  # ... but summed
    encoded = wire.encode(g1, SHARDS, 1, lambda: denominators)
    assert encoded is not None
    # The first compressed push: the warm-up's momentum in g / D's units, corrected for 2 steps.
    want = (0.09 * g0[600:] / 0.5 + 0.1 * g1[600:] / 0.5) / 0.19
    torch.testing.assert_close(compress.decode(encoded[1]), want, atol=0.05, rtol=0.02)
    wire.reset()
    assert wire.momentum.momentum("shard0") is None
    again = wire.encode(g1, SHARDS, 2, lambda: denominators)
    assert again is not None  # a fresh momentum: its first push is g / D
    torch.testing.assert_close(compress.decode(again[0]), g1[:600] / 2.0, atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="preconditioned"):
        WirePush("sign", common_pb2.DTYPE_FLOAT32, "job", WorkerMetrics(), momentum_beta1=0.9)


def test_a_rewind_to_a_saved_step_replays_the_same_bytes_and_to_another_starts_from_none():
    """save_every = 2: the state before the pushes of steps 2 and 4 is kept (the newest two);
    a rollback to 4 replays steps 4-5 bitwise (residuals, warm-up residuals and momenta taken
    back), one to 3 starts from none, and one to 2 after it still finds step 2's state."""
    def make() -> WirePush:
        return WirePush("sign", common_pb2.DTYPE_FLOAT32, "job", WorkerMetrics(), warmup_steps=2,
                        precondition=True, momentum_beta1=0.9, warmup_setting="int8", save_every=2)

    def fetch() -> list[torch.Tensor]:
        return [torch.full((600,), 2.0), torch.full((400,), 0.5)]

    grads = [torch.randn(1000, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    straight = make()
    pushed = [straight.encode(g, SHARDS, s, fetch) for s, g in enumerate(grads)]
    wire = make()
    for s in range(6):
        wire.encode(grads[s], SHARDS, s, fetch)
    wire.rewind(4)
    assert [wire.encode(grads[s], SHARDS, s, fetch) for s in (4, 5)] == pushed[4:]
    wire.rewind(3)  # not saved: from none, unlike the straight run
    assert wire.encode(grads[3], SHARDS, 3, fetch) != pushed[3]
    wire.rewind(2)  # saved before the rewind to 3, which dropped step 4's only
    assert [wire.encode(grads[s], SHARDS, s, fetch) for s in range(2, 6)] == pushed[2:]
    assert sorted(wire._saved) == [2, 4]
    for unsaved in (WirePush("sign", common_pb2.DTYPE_FLOAT32, "job", WorkerMetrics()),
                    WirePush("sign", common_pb2.DTYPE_FLOAT32, "job", WorkerMetrics(), save_every=2, saved_kept=0)):
        for s in range(3):
            unsaved.encode(grads[s], SHARDS, s)
        unsaved.rewind(2)  # checkpoint.worker_copies 0, or no periodic checkpoints: from none
        assert unsaved.feedback is not None and unsaved.feedback.residual("shard0") is None
