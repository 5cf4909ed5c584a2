"""Error feedback (worker/feedback.py): what is dropped is carried, and the books balance."""

import pytest
import torch

from shardps.proto import compress
from shardps.worker.feedback import ErrorFeedback


def _grads(steps, numel, integer):
    g = torch.Generator().manual_seed(7)
    if integer:  # small integers: every float32 sum and difference below is exact
        return [torch.randint(-50, 51, (numel,), generator=g).float() for _ in range(steps)]
    return [torch.randn(numel, generator=g) for _ in range(steps)]


def test_topk_feedback_balances_exactly_sent_plus_residual_equals_the_gradients():
    feedback = ErrorFeedback(compress.TopK(0.05))
    grads = _grads(40, 500, integer=True)
    sent = torch.zeros(500)
    for g in grads:
        sent += compress.decode(feedback.compress("w", g))
    residual = feedback.residual("w")
    assert residual is not None
    assert torch.equal(sent + residual, torch.stack(grads).sum(0))


@pytest.mark.parametrize("comp", [compress.Int8(64), compress.Sign(128), compress.TopK(0.05)],
                         ids=lambda c: c.name)
def test_feedback_balances_to_rounding_for_every_compressor(comp):
    feedback = ErrorFeedback(comp)
    grads = _grads(40, 500, integer=False)
    sent = torch.zeros(500, dtype=torch.float64)
    for g in grads:
        sent += compress.decode(feedback.compress("w", g)).double()
    total = torch.stack(grads).double().sum(0)
    residual = feedback.residual("w")
    assert residual is not None
    # Each step rounds twice in fp32 (grad + residual, corrected - decoded), ~1e-7 relative.
    assert torch.allclose(sent + residual.double(), total, rtol=0, atol=1e-4)
    # And the residual is real: what was sent alone falls short of the gradients.
    assert (sent - total).abs().max() > 1e-2


def test_the_residual_is_added_before_compressing_the_next_step():
    feedback = ErrorFeedback(compress.TopK(0.5))
    first = compress.decode(feedback.compress("w", torch.tensor([4.0, 1.0])))
    assert torch.equal(first, torch.tensor([4.0, 0.0]))
    assert torch.equal(feedback.residual("w"), torch.tensor([0.0, 1.0]))
    second = compress.decode(feedback.compress("w", torch.tensor([0.5, 0.75])))
    assert torch.equal(second, torch.tensor([0.0, 1.75]))  # 1.0 carried + 0.75 beats 0.5


def test_residuals_are_kept_per_tensor_and_cleared_by_reset():
    feedback = ErrorFeedback(compress.TopK(0.5))
    feedback.compress("a", torch.tensor([3.0, 1.0]))
    feedback.compress("b", torch.tensor([2.0, 5.0]))
    assert torch.equal(feedback.residual("a"), torch.tensor([0.0, 1.0]))
    assert torch.equal(feedback.residual("b"), torch.tensor([2.0, 0.0]))
    feedback.reset()
    assert feedback.residual("a") is None


def test_without_feedback_nothing_is_carried():
    feedback = ErrorFeedback(compress.TopK(0.5), enabled=False)
    feedback.compress("w", torch.tensor([4.0, 1.0]))
    assert feedback.residual("w") is None
    second = compress.decode(feedback.compress("w", torch.tensor([0.5, 0.75])))
    assert torch.equal(second, torch.tensor([0.0, 0.75]))


def test_a_tensor_changing_size_is_refused_and_keeps_its_residual():
    feedback = ErrorFeedback(compress.TopK(0.5))
    feedback.compress("w", torch.tensor([4.0, 1.0]))
    with pytest.raises(ValueError, match="'w' has 3 elements, its residual 2"):
        feedback.compress("w", torch.ones(3))
    assert torch.equal(feedback.residual("w"), torch.tensor([0.0, 1.0]))


def test_the_callers_gradient_is_not_modified():
    feedback = ErrorFeedback(compress.Int8(4))
    g = torch.tensor([0.3, -0.7, 0.11, 0.9])
    keep = g.clone()
    feedback.compress("w", g)
    feedback.compress("w", g)
    assert torch.equal(g, keep)


@pytest.mark.parametrize("comp", [compress.Int8(256), compress.Sign(4096), compress.Sign(100), compress.TopK(0.05)],
                         ids=lambda c: f"{c.name}{getattr(c, 'block', '')}")
@pytest.mark.parametrize("enabled", [True, False])
def test_compress_with_a_momentum_fill_is_compress_of_the_momentum_bitwise(comp, enabled):
    """The worker's fused pass (WorkerMomentum.frozen filling the residual as the codec goes)
    sends the same bytes and keeps the same residual as stepping the momentum whole and
    compressing that, step after step, from the first (no residual yet) on."""
    from shardps.worker.momentum import WorkerMomentum

    n = 3 * compress.CHUNK + 777
    denom = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5
    fused, plain = ErrorFeedback(comp, enabled), ErrorFeedback(comp, enabled)
    fused_m, plain_m = WorkerMomentum(0.9), WorkerMomentum(0.9)
    for g in _grads(4, n, integer=False):
        fused_m.warm("w", g)
        plain_m.warm("w", g)
    for g in _grads(3, n, integer=False):
        assert fused.compress_with("w", n, fused_m.frozen("w", g, denom)) == \
            plain.compress("w", plain_m.step("w", g, denom))
        assert torch.equal(fused_m.momentum("w"), plain_m.momentum("w"))
        if enabled:
            assert torch.equal(fused.residual("w").view(torch.int32), plain.residual("w").view(torch.int32))
