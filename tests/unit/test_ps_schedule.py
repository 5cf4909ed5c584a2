"""Learning-rate schedules of the parameter server."""

import math

import pytest

from shardps.proto import common_pb2
from shardps.server.ps import schedule
from shardps.server.ps.errors import InvalidConfigError


def opt(**kw) -> common_pb2.OptimizerConfig:
    base = dict(name="adam", lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    return common_pb2.OptimizerConfig(**{**base, **kw})


def test_constant_and_unset_schedule_are_flat():
    for cfg in (opt(schedule="constant"), opt()):
        assert [schedule.learning_rate(cfg, k) for k in (0, 1, 1000)] == [0.1, 0.1, 0.1]


def test_linear_warmup_ramps_then_holds():
    cfg = opt(schedule="linear_warmup", warmup_steps=4)
    lrs = [schedule.learning_rate(cfg, k) for k in range(6)]
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert schedule.learning_rate(opt(schedule="linear_warmup", warmup_steps=0), 0) == 0.1


def test_cosine_warms_up_decays_to_min_and_stays():
    cfg = opt(schedule="cosine", warmup_steps=2, total_steps=12, min_lr=0.01)
    lr = [schedule.learning_rate(cfg, k) for k in range(20)]
    assert lr[0] == pytest.approx(0.05)
    assert lr[1] == pytest.approx(0.1)
    assert lr[2] == pytest.approx(0.1)               # decay starts at the peak
    assert lr[7] == pytest.approx(0.055)             # half way: (lr + min_lr) / 2
    assert lr[12] == pytest.approx(0.01)
    assert lr[19] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lr[2:], lr[3:], strict=False))
    k = 4  # one interior point against the closed form
    assert lr[k] == pytest.approx(0.01 + 0.045 * (1 + math.cos(math.pi * (k - 2) / 10)))


@pytest.mark.parametrize("kw", [
    dict(name="sgd"), dict(lr=0.0), dict(lr=float("nan")), dict(beta1=1.0), dict(beta2=-0.1),
    dict(eps=0.0), dict(weight_decay=-1.0), dict(schedule="step"), dict(warmup_steps=-1),
    dict(schedule="cosine", total_steps=0), dict(schedule="cosine", warmup_steps=5, total_steps=5),
    dict(schedule="cosine", total_steps=10, min_lr=0.5),
])
def test_invalid_configs_are_rejected(kw):
    with pytest.raises(InvalidConfigError):
        schedule.validate(opt(**kw))


def test_valid_configs_pass():
    schedule.validate(opt())
    schedule.validate(opt(name="adamw", weight_decay=0.01, schedule="cosine", warmup_steps=3,
                          total_steps=10, min_lr=0.001))
