"""Training through each compressor on digits: steps to a test accuracy target, with and
without error feedback, against uncompressed fp32 (one process, full-batch Adam, fixed seed).

Full-batch gradients make the trajectory deterministic and smooth, so the step at which the
target is first met is a stable number rather than a draw from minibatch noise. The scheme
that brings top-k within 1.1x under Adam (frozen-variance Adam, the servers' own Updater) is
in tests/unit/test_frozen_adam_convergence.py.
"""

import pytest
import torch

from shardps.proto import compress
from shardps.worker.datasets import digits
from shardps.worker.feedback import ErrorFeedback

TARGET = 0.95  # test accuracy; fp32 reaches it in 28 steps with these settings
MAX_STEPS = 300


@pytest.fixture(scope="module")
def data():
    return digits(0)


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


def sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def steps_to_target(data, comp: compress.Compressor | None, error_feedback: bool = True,
                    optimizer=adam) -> int:
    """The first step after which test accuracy is >= TARGET (MAX_STEPS + 1 if never)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = optimizer(model.parameters())
    feedback = ErrorFeedback(comp, error_feedback) if comp is not None else None
    for step in range(1, MAX_STEPS + 1):
        loss = torch.nn.functional.cross_entropy(model(data.train_x), data.train_y)
        opt.zero_grad()
        loss.backward()
        if feedback is not None:
            for name, p in model.named_parameters():
                assert p.grad is not None
                p.grad = compress.decode(feedback.compress(name, p.grad)).view_as(p)
        opt.step()
        with torch.no_grad():
            if (model(data.test_x).argmax(1) == data.test_y).float().mean() >= TARGET:
                return step
    return MAX_STEPS + 1


@pytest.fixture(scope="module")
def fp32_steps(data):
    steps = steps_to_target(data, None)
    assert steps <= 60, "the baseline itself no longer reaches the target quickly"
    return steps


def test_int8_with_error_feedback_reaches_the_target_within_1_1x_the_steps_of_fp32(data, fp32_steps):
    assert steps_to_target(data, compress.Int8(256)) <= 1.1 * fp32_steps


# Measured with these settings (fp32: 28 steps), the servers' plain Adam: top-k 10% with EF
# 53, without 46; top-k 30% with EF 33, without 31; sign with EF 40, without 31. Adam divides
# each coordinate by its own running magnitude, so a residual released in one burst moves that
# weight by a full step at once: error feedback alone does not meet 1.1x under Adam. What does
# for top-k is below (frozen-variance Adam after an uncompressed warm-up).
@pytest.mark.parametrize("comp", [compress.TopK(0.1), compress.TopK(0.3), compress.Sign(4096)],
                         ids=["topk0.1", "topk0.3", "sign"])
def test_under_plain_adam_sparse_and_sign_with_error_feedback_take_more_than_1_1x(data, fp32_steps, comp):
    assert steps_to_target(data, comp) > 1.1 * fp32_steps


@pytest.mark.parametrize("comp", [compress.TopK(0.1), compress.Sign(4096)], ids=["topk0.1", "sign"])
def test_every_compressor_still_reaches_the_target(data, comp):
    assert steps_to_target(data, comp, error_feedback=True) <= MAX_STEPS
    assert steps_to_target(data, comp, error_feedback=False) <= MAX_STEPS


def test_under_sgd_with_momentum_error_feedback_is_what_brings_topk_within_1_1x(data):
    # Measured: fp32 51 steps; top-k 10% 54 with EF, 72 without; sign 59 with EF, 92 without.
    fp32 = steps_to_target(data, None, optimizer=sgd_momentum)
    topk = compress.TopK(0.1)
    assert steps_to_target(data, topk, optimizer=sgd_momentum) <= 1.1 * fp32
    assert steps_to_target(data, topk, error_feedback=False, optimizer=sgd_momentum) > 1.1 * fp32
    sign = compress.Sign(4096)
    assert (steps_to_target(data, sign, optimizer=sgd_momentum)
            < steps_to_target(data, sign, error_feedback=False, optimizer=sgd_momentum))
