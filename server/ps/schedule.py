"""Learning-rate schedules: the lr of Adam step k (0-based) for an `OptimizerConfig`."""

from __future__ import annotations

import math

from shardps.proto import common_pb2, names
from shardps.proto.spec import FP32_MAX, MAX_WEIGHT_DECAY, MIN_EPS

from .errors import InvalidConfigError

SCHEDULES = ("constant", "linear_warmup", "cosine")


def schedule_name(config: common_pb2.OptimizerConfig) -> str:
    """The config's schedule; an unset (empty) name means "constant"."""
    return config.schedule or "constant"


def validate(config: common_pb2.OptimizerConfig) -> None:
    """Raises InvalidConfigError if the optimizer settings cannot run."""
    name = config.name or "adam"
    if name not in ("adam", "adamw"):
        raise InvalidConfigError(f"optimizer.name must be adam or adamw, got {names.shown(name)}")
    # The job spec's ranges (shardps.proto.spec), which also keep Adam's fp32 state finite:
    # an eps that fp32 rounds to 0 makes 0/0 = NaN of every weight whose gradient is 0.
    if not (math.isfinite(config.lr) and 0 < config.lr <= FP32_MAX):
        raise InvalidConfigError(f"optimizer.lr must be in (0, {FP32_MAX:.4g}], got {config.lr}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(config, key) < 1.0:
            raise InvalidConfigError(f"optimizer.{key} must be in [0, 1), got {getattr(config, key)}")
    if not (math.isfinite(config.eps) and MIN_EPS <= config.eps <= FP32_MAX):
        raise InvalidConfigError(f"optimizer.eps must be in [{MIN_EPS:g}, {FP32_MAX:.4g}], "
                                 f"got {config.eps}")
    if not (math.isfinite(config.weight_decay) and 0 <= config.weight_decay <= MAX_WEIGHT_DECAY):
        raise InvalidConfigError(f"optimizer.weight_decay must be in [0, {MAX_WEIGHT_DECAY:g}], "
                                 f"got {config.weight_decay}")
    if config.freeze_variance_after < 0:
        raise InvalidConfigError(f"optimizer.freeze_variance_after must be >= 0, got "
                                 f"{config.freeze_variance_after}")
    if config.precondition_pushes and not config.freeze_variance_after:
        raise InvalidConfigError("optimizer.precondition_pushes needs freeze_variance_after > 0")
    if config.worker_momentum and not config.precondition_pushes:
        raise InvalidConfigError("optimizer.worker_momentum needs precondition_pushes")
    schedule = schedule_name(config)
    if schedule not in SCHEDULES:
        raise InvalidConfigError(f"optimizer.schedule must be one of {SCHEDULES}, got {names.shown(schedule)}")
    if config.warmup_steps < 0:
        raise InvalidConfigError(f"optimizer.warmup_steps must be >= 0, got {config.warmup_steps}")
    if schedule == "cosine":
        if config.total_steps <= config.warmup_steps:
            raise InvalidConfigError(
                f"cosine needs total_steps > warmup_steps, got {config.total_steps} <= "
                f"{config.warmup_steps}")
        if not 0.0 <= config.min_lr <= config.lr:
            raise InvalidConfigError(f"optimizer.min_lr must be in [0, lr], got {config.min_lr}")


def learning_rate(config: common_pb2.OptimizerConfig, step: int) -> float:
    """The learning rate of Adam step `step` (0-based) under the config's schedule.

    constant: lr. linear_warmup: lr * min(1, (k+1)/warmup_steps). cosine: the same warmup, then
    a half cosine from lr down to min_lr reached at k = total_steps, and min_lr after that.
    """
    schedule = schedule_name(config)
    warmup = config.warmup_steps
    if schedule == "constant":
        return config.lr
    if step < warmup:
        return config.lr * ((step + 1) / warmup)
    if schedule == "linear_warmup":
        return config.lr
    progress = min(1.0, (step - warmup) / (config.total_steps - warmup))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))
