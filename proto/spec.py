"""The job spec: schema, defaults and validation (DESIGN.md, "Job spec").

`parse_spec(text)` turns YAML into a normalised plain dict with every default filled in, or
raises SpecError naming the offending key (e.g. `optimizer.lr: must be > 0, got -1`).
The coordinator validates at submit; workers and servers read the normalised form.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import yaml

from shardps.proto import names

# Built-in model and dataset names; the worker's registries must define exactly these
# (a unit test checks it). Anything else must be an import path "package.module:factory".
BUILTIN_MODELS = ("mlp", "cnn", "gru", "transformer")
BUILTIN_DATASETS = ("digits", "regression", "text")

# Evaluation metrics and whether bigger is better.
METRICS = {"accuracy": True, "loss": False, "mse": False, "perplexity": False}

CONSISTENCY_MODES = ("sync", "ssp", "async")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "linear_warmup", "cosine")
TRANSPORT_DTYPES = ("float32", "bfloat16", "float16")

# Matched in full (fullmatch): `$` would also match before a trailing newline.
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class SpecError(ValueError):
    """A job spec that cannot run; the message starts with the dotted key at fault."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key


Check = Callable[[str, Any], Any]


def _int(lo: int | None = None, hi: int | None = None) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(key, f"must be an integer, got {value!r}")
        if lo is not None and value < lo:
            raise SpecError(key, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise SpecError(key, f"must be <= {hi}, got {value}")
        return value

    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> Check:
    def check(key: str, value: Any) -> float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-8" as a string
            try:
                value = float(value)
            except ValueError:
                raise SpecError(key, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(key, f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise SpecError(key, f"must be finite, got {value}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise SpecError(key, f"must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
        if hi is not None and (value >= hi if hi_open else value > hi):
            raise SpecError(key, f"must be {'<' if hi_open else '<='} {hi:g}, got {value:g}")
        return value

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(key, f"must be true or false, got {value!r}")
    return value


def _choice(options: tuple[str, ...]) -> Check:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise SpecError(key, f"must be one of {', '.join(options)}; got {value!r}")
        return str(value)

    return check


def _name(key: str, value: Any) -> str:
    # The one identifier rule (proto/names.py): a job id is this name + "-" + 6 hex digits,
    # and servers use job ids as directory names.
    if not names.is_valid(value, names.MAX_JOB_NAME):
        raise SpecError(key, f"must be {names.RULE.format(n=names.MAX_JOB_NAME)}; got "
                             f"{names.shown(value)}")
    return value


def _factory(builtins: tuple[str, ...], what: str) -> Check:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise SpecError(key, f"must be a string, got {value!r}")
        if value in builtins or _IMPORT_PATH.fullmatch(value):
            return value
        raise SpecError(
            key,
            f"unknown {what} {value!r}; built-ins are {', '.join(builtins)}, "
            "or give an import path 'package.module:factory'",
        )

    return check


def _kwargs(key: str, value: Any) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SpecError(key, f"must be a mapping with string keys, got {value!r}")
    return dict(value)


def _betas(key: str, value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SpecError(key, f"must be a list of two numbers, got {value!r}")
    return [_float(0.0, 1.0, hi_open=True)(f"{key}[{i}]", v) for i, v in enumerate(value)]


REQUIRED = object()  # marks a field without a default

# The schema: key -> (check, default) or a nested schema. Order is the canonical order.
SCHEMA: dict[str, Any] = {
    "name": (_name, "job"),
    "seed": (_int(0, 2**63 - 1), 0),
    "model": {
        "name": (_factory(BUILTIN_MODELS, "model"), REQUIRED),
        "kwargs": (_kwargs, {}),
    },
    "data": {
        "dataset": (_factory(BUILTIN_DATASETS, "dataset"), REQUIRED),
        "batch_size": (_int(1, 1 << 20), 64),
        "shuffle": (_bool, True),
        "kwargs": (_kwargs, {}),
    },
    "optimizer": {
        "name": (_choice(OPTIMIZERS), "adam"),
        "lr": (_float(0.0, lo_open=True), 0.001),
        "betas": (_betas, [0.9, 0.999]),
        "eps": (_float(0.0, lo_open=True), 1e-8),
        "weight_decay": (_float(0.0), 0.0),
        "clip_grad_norm": (_float(0.0), 0.0),
        "schedule": {
            "name": (_choice(SCHEDULES), "constant"),
            "warmup_steps": (_int(0), 0),
            "total_steps": (_int(0), 0),
            "min_lr": (_float(0.0), 0.0),
        },
    },
    "consistency": {
        "mode": (_choice(CONSISTENCY_MODES), "sync"),
        "staleness": (_int(0, 1_000_000), 0),
    },
    "cluster": {
        "servers": (_int(1, 1024), 1),
        "workers": (_int(1, 4096), 1),
    },
    "transport": {
        "dtype": (_choice(TRANSPORT_DTYPES), "float32"),
        "chunk_bytes": (_int(4096, 16 * 1024 * 1024), 1024 * 1024),
    },
    "stop": {
        "max_steps": (_int(0), 0),
        "max_epochs": (_float(0.0), 0.0),
        "target": {
            "metric": (_choice(tuple(METRICS)), "accuracy"),
            "value": (_float(), None),
        },
        "patience": (_int(0), 0),
        "min_delta": (_float(0.0), 0.0),
        "eval_every": (_int(1), 100),
    },
    "checkpoint": {
        "every_steps": (_int(0), 0),
        "keep": (_int(1, 1000), 3),
    },
}


def _apply(schema: dict[str, Any], data: Any, prefix: str) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(prefix.rstrip("."), f"must be a mapping, got {data!r}")
    unknown = [k for k in data if k not in schema]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise SpecError(key, f"unknown key (allowed here: {', '.join(schema)})")
    out: dict[str, Any] = {}
    for key, rule in schema.items():
        path = f"{prefix}{key}"
        if isinstance(rule, dict):
            out[key] = _apply(rule, data.get(key), f"{path}.")
            continue
        check, default = rule
        if key not in data or data[key] is None:
            if default is REQUIRED:
                raise SpecError(path, "is required")
            out[key] = default if not isinstance(default, (dict, list)) else type(default)(default)
            continue
        out[key] = check(path, data[key])
    return out


def validate(raw: Any) -> dict[str, Any]:
    """Validates a spec given as a (YAML-loaded) mapping; returns the normalised spec."""
    spec = _apply(SCHEMA, raw, "")
    stop = spec["stop"]
    if stop["target"]["value"] is None:
        stop["target"] = None
    if not (stop["max_steps"] or stop["max_epochs"] or stop["target"]):
        raise SpecError("stop", "needs at least one of max_steps, max_epochs or target.value")
    if stop["target"] and stop["target"]["metric"] == "accuracy" and stop["target"]["value"] > 1:
        raise SpecError("stop.target.value", "accuracy is a fraction in [0, 1]")
    sched = spec["optimizer"]["schedule"]
    if sched["name"] == "cosine" and not (sched["total_steps"] or stop["max_steps"]):
        raise SpecError("optimizer.schedule.total_steps", "cosine needs total_steps or stop.max_steps")
    if sched["min_lr"] > spec["optimizer"]["lr"]:
        raise SpecError("optimizer.schedule.min_lr", "must not exceed optimizer.lr")
    mode = spec["consistency"]["mode"]
    if mode != "ssp" and spec["consistency"]["staleness"]:
        raise SpecError("consistency.staleness", f"only applies to mode ssp, not {mode}")
    return spec


def parse_spec(text: str) -> dict[str, Any]:
    """Parses and validates YAML spec text; raises SpecError with the key at fault."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError("", f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError("", "a job spec must be a YAML mapping")
    return validate(raw)


def dump_spec(spec: dict[str, Any]) -> str:
    """The canonical YAML text of a normalised spec (key order as in SCHEMA)."""
    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=None)


def metric_improves(metric: str, new: float, old: float, min_delta: float = 0.0) -> bool:
    """True if `new` beats `old` by more than min_delta in the metric's direction."""
    if METRICS[metric]:
        return new > old + min_delta
    return new < old - min_delta
