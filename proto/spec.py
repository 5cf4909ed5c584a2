"""The job spec: schema, defaults, limits and validation (README, "The job spec").

`parse_spec(text)` turns YAML into a normalised plain dict with every default filled in, or
raises SpecError naming the offending key (e.g. `optimizer.lr: must be > 0, got -1`).
`normalise(text)` also gives the canonical YAML of that dict. The coordinator validates at
submit, before it takes its lock; workers and servers read the normalised form.

Anyone holding the token may submit a spec, so parsing is bounded before it starts: at most
MAX_SPEC_BYTES of text, no YAML anchors or aliases (a job spec has no use for them, and they
are what makes a 500-byte "billion laughs" expand to gigabytes), at most MAX_DEPTH levels of
nesting and MAX_NODES values, checked as the document is composed, before any recursion can
go deep or any object is built. Every number has a range that fits the type it travels and
is used in (see the SCHEMA), and an error message shows at most MAX_SHOWN characters of the
value at fault.
"""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, cast

import yaml
from typing_extensions import ReadOnly
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, CollectionStartEvent, Event
from yaml.resolver import Resolver

from shardps.proto import names

# Built-in model and dataset names; the worker's registries must define exactly these
# (a unit test checks it). Anything else must be an import path "package.module:factory".
BUILTIN_MODELS = ("mlp", "cnn", "gru", "transformer", "dlrm")
BUILTIN_DATASETS = ("digits", "regression", "text", "files")
FILE_FORMATS = ("ctr",)  # record schemas of file datasets (docs/data.md): ctr = the click log

# Evaluation metrics and whether bigger is better.
METRICS = {"accuracy": True, "loss": False, "mse": False, "perplexity": False,
           "auc": True, "logloss": False}  # auc, logloss: binary tasks (clicks)

CONSISTENCY_MODES = ("sync", "ssp", "async")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "linear_warmup", "cosine")
TABLE_OPTIMIZERS = ("lazy_adam", "adagrad")  # embedding tables' row-wise optimizers
TRANSPORT_DTYPES = ("float32", "bfloat16", "float16")

# -- limits ----------------------------------------------------------------------------------
# The document. A real spec is about 1 KiB, 4 levels deep and 60 values; these leave ample
# room for model and dataset kwargs, and bound what one submit costs the coordinator (at most
# about 0.2 s of CPU on a slow core, and none of it under the coordinator's lock).
MAX_SPEC_BYTES = 64 * 1024  # UTF-8 bytes of the text, as submitted and as normalised
MAX_DEPTH = 32              # nested mappings and sequences
MAX_NODES = 4096            # values (scalars, mappings, sequences, keys included)
MAX_SHOWN = 60              # characters of a value echoed in an error message
MAX_MESSAGE = 300           # characters of any SpecError message

# The numbers (docs in the SCHEMA below).
MAX_STEPS = 2**31 - 1       # any count of steps or evaluations (the wire's int64 fits them)
MAX_SEED = 2**63 - 1        # torch generators take < 2**64; seed + epoch stays below
MAX_EPOCHS = 1e6
MAX_REPLICAS = 8  # copies of a shard (cluster.replicas)
MAX_SHARDS = 1024  # shards of a job's dense vector (cluster.shards)
FP32_MAX = 3.4028234663852886e38  # the largest finite float32: servers apply Adam in fp32
# The smallest Adam eps: fp32 flushes anything below ~1.2e-38 to 0, and then a weight whose
# gradient is 0 gets 0/0 = NaN. 1e-30 keeps far from that edge (torch's default is 1e-8).
MIN_EPS = 1e-30
# L2 weight decay adds weight_decay * w to every gradient: past this it swamps any loss,
# and times a large weight it could overflow Adam's second moment.
MAX_WEIGHT_DECAY = 1e3

# Dynamic embedding tables: admission counters saturate at 2**31 - 1; a server holds at most
# 2**40 rows or bytes of a table (far beyond any machine); the admission sketch of
# 8 x 2**24 int32 counters is 512 MiB per table and server, the most a spec may ask for.
MAX_ADMIT_AFTER = 2**31 - 1
MAX_TABLE_ROWS = 2**40
MAX_TABLE_BYTES = 2**50
MAX_SKETCH_WIDTH = 1 << 24

# Matched in full (fullmatch): `$` would also match before a trailing newline.
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def show(value: Any, limit: int = MAX_SHOWN) -> str:
    """repr(value) cut to `limit` characters, for error messages (a hostile spec's value may
    be 64 KiB long, or an integer too long for repr)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SpecError(ValueError):
    """A job spec that cannot run; the message starts with the dotted key at fault."""

    def __init__(self, key: str, problem: str):
        message = f"{key}: {problem}" if key else problem
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.key = key


Check = Callable[[str, Any], Any]

# parse_spec(text, clamped=[...]) sets this: out-of-range numbers are then clamped into range
# (each noted in the list) instead of refused. Only for reading back what an older version
# stored (the coordinator's state dir); a submitted spec is never clamped.
_clamping: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("_clamping",
                                                                               default=None)


def _out_of_range(key: str, value: Any, rule: str, bound: Any) -> Any:
    """Refuses `value` (`rule` says why), or clamps it to `bound` in clamping mode."""
    clamped = _clamping.get()
    if clamped is None:
        raise SpecError(key, f"{rule}, got {show(value)}")
    clamped.append(f"{key}: {show(value)} clamped to {bound}")
    return bound


def _int(lo: int, hi: int) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(key, f"must be an integer, got {show(value)}")
        if value < lo:
            return _out_of_range(key, value, f"must be >= {lo}", lo)
        if value > hi:
            return _out_of_range(key, value, f"must be <= {hi}", hi)
        return value

    return check


def _float(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(key: str, value: Any) -> float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-8" as a string
            try:
                value = float(value)
            except ValueError:
                raise SpecError(key, f"must be a number, got {show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(key, f"must be a number, got {show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise SpecError(key, f"must be finite, got {show(value)}") from None
        if not math.isfinite(value):
            raise SpecError(key, f"must be finite, got {value}")
        if lo_open and value <= lo:  # no value to clamp to
            raise SpecError(key, f"must be > {lo:g}, got {value:g}")
        if hi_open and value >= hi:
            raise SpecError(key, f"must be < {hi:g}, got {value:g}")
        if value < lo:
            return _out_of_range(key, value, f"must be >= {lo:g}", lo)
        if value > hi:
            return _out_of_range(key, value, f"must be <= {hi:g}", hi)
        return value

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(key, f"must be true or false, got {show(value)}")
    return value


def _choice(options: tuple[str, ...]) -> Check:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise SpecError(key, f"must be one of {', '.join(options)}; got {show(value)}")
        return value

    return check


def _compress(key: str, value: Any) -> str:
    """transport.compress: "none", or a setting proto/compress.py's `parse` reads."""
    if value == "none":
        return value
    if not isinstance(value, str):
        raise SpecError(key, f"must be none, topk[:RATIO], int8[:BLOCK] or sign[:BLOCK]; got {show(value)}")
    from shardps.proto import compress  # imports torch: only for specs that compress

    try:
        compress.parse(value)
    except ValueError as exc:
        raise SpecError(key, str(exc).removeprefix("transport.compress ")) from None
    return value


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
            raise SpecError(key, f"must be a string, got {show(value)}")
        if value in builtins or _IMPORT_PATH.fullmatch(value):
            return value
        raise SpecError(
            key,
            f"unknown {what} {show(value)}; built-ins are {', '.join(builtins)}, "
            "or give an import path 'package.module:factory'",
        )

    return check


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SpecError(key, f"must be a string, got {show(value)}")
    return value


def _kwargs(key: str, value: Any) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SpecError(key, f"must be a mapping with string keys, got {show(value)}")
    return dict(value)


def _betas(key: str, value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SpecError(key, f"must be a list of two numbers, got {show(value)}")
    return [_float(0.0, 1.0, hi_open=True)(f"{key}[{i}]", v) for i, v in enumerate(value)]


REQUIRED = object()  # marks a field without a default

# One embedding table's settings (the spec's `tables:` section, and each entry of its
# per_table map). lr and eps 0 take the job's optimizer values; a non-zero eps is at least
# MIN_EPS, as the optimizer's. The rest apply to dynamic tables only (fixed tables ignore
# them); caps are per server (each server holds at most that much of the table).
TABLE_SETTINGS: dict[str, Any] = {
    "optimizer": (_choice(TABLE_OPTIMIZERS), "lazy_adam"),
    "lr": (_float(0.0, FP32_MAX), 0.0),
    "eps": (_float(0.0, FP32_MAX), 0.0),
    "weight_decay": (_float(0.0, MAX_WEIGHT_DECAY), 0.0),  # adagrad only
    "initial_accumulator_value": (_float(0.0, FP32_MAX), 0.0),  # adagrad only
    "admit_after": (_int(1, MAX_ADMIT_AFTER), 1),  # sightings before an id gets a row
    "evict_after_steps": (_int(0, MAX_STEPS), 0),  # 0: rows are never evicted for idleness
    "max_rows": (_int(0, MAX_TABLE_ROWS), 0),      # rows per server; 0: no cap
    "max_bytes": (_int(0, MAX_TABLE_BYTES), 0),    # bytes per server; 0: no cap
    "sketch_width": (_int(64, MAX_SKETCH_WIDTH), 1 << 20),  # admission counters, a power of 2
    "sketch_depth": (_int(1, 8), 4),
    "sketch_halve_every": (_int(0, MAX_STEPS), 0),  # steps; 0: admission counts never age
}

# The schema: key -> (check, default) or a nested schema. Order is the canonical order.
# Every number has a range. Counts of steps fit the wire's int64 with room to add to them;
# floats the servers use in fp32 (lr, eps, weight decay) stay finite there; the rest are
# bounded by what makes sense (a batch of a million samples, 4096 workers, a million epochs).
SCHEMA: dict[str, Any] = {
    "name": (_name, "job"),
    "seed": (_int(0, MAX_SEED), 0),
    "model": {
        "name": (_factory(BUILTIN_MODELS, "model"), REQUIRED),
        "kwargs": (_kwargs, {}),
    },
    "data": {
        "dataset": (_factory(BUILTIN_DATASETS, "dataset"), REQUIRED),
        "batch_size": (_int(1, 1 << 20), 64),
        "shuffle": (_bool, True),
        "kwargs": (_kwargs, {}),
        # dataset "files": shard files on disk, each worker reading its own (docs/data.md).
        "files": {
            "path": (_text, ""),            # a directory (its manifest or *.npy) or a glob
            "format": (_choice(FILE_FORMATS), "ctr"),
            "test": (_text, ""),            # held-out files; "" = the last `holdout` of path
            "holdout": (_int(0, 1 << 20), 1),
            "prefetch": (_int(1, 1024), 4),  # batches read ahead per worker
            "skip_bad": (_bool, False),      # leave a bad file out instead of failing the job
        },
    },
    "optimizer": {
        "name": (_choice(OPTIMIZERS), "adam"),
        "lr": (_float(0.0, FP32_MAX, lo_open=True), 0.001),
        "betas": (_betas, [0.9, 0.999]),
        "eps": (_float(MIN_EPS, FP32_MAX), 1e-8),
        "weight_decay": (_float(0.0, MAX_WEIGHT_DECAY), 0.0),
        "clip_grad_norm": (_float(0.0, FP32_MAX), 0.0),
        # Frozen-variance Adam after this many steps (0: never); with compress_warmup_steps,
        # what top-k and sign pushes need under Adam (docs/network.md).
        "freeze_variance_after": (_int(0, MAX_STEPS), 0),
        # Once frozen, workers push g / D (D: the frozen denominator) and the servers do not
        # divide again: what sign pushes need (docs/network.md, "Preconditioned pushes").
        "precondition_pushes": (_bool, False),
        # With precondition_pushes: each worker pushes its own momentum of g / D and the
        # servers keep none (1-bit Adam; docs/network.md, "Worker momentum").
        "worker_momentum": (_bool, False),
        "schedule": {
            "name": (_choice(SCHEDULES), "constant"),
            "warmup_steps": (_int(0, MAX_STEPS), 0),
            "total_steps": (_int(0, MAX_STEPS), 0),
            "min_lr": (_float(0.0, FP32_MAX), 0.0),
        },
    },
    "consistency": {
        "mode": (_choice(CONSISTENCY_MODES), "sync"),
        "staleness": (_int(0, 1_000_000), 0),
    },
    "cluster": {
        "servers": (_int(1, 1024), 1),
        "workers": (_int(1, 4096), 1),
        # Copies of each shard: a primary and replicas - 1 backups on other servers
        # (docs/architecture.md, "Replicated shards"); 1 = no backups.
        "replicas": (_int(1, MAX_REPLICAS), 1),
        # Shards of the dense vector (docs/architecture.md, "Resharding"): shard i lives on
        # server i mod servers; at least cluster.servers; unset = cluster.servers. A job that
        # may be resharded to N servers needs shards >= N.
        "shards": (_int(1, MAX_SHARDS), None),
    },
    "transport": {
        "dtype": (_choice(TRANSPORT_DTYPES), "float32"),
        "chunk_bytes": (_int(4096, 16 * 1024 * 1024), 1024 * 1024),
        # Pushes: "none" (the dtype above), or a lossy encoding with error feedback on the
        # worker (docs/network.md): topk[:RATIO], int8[:BLOCK], sign[:BLOCK].
        "compress": (_compress, "none"),
        # Pulls: "none" (the dtype above), or deltas against the worker's copy in that encoding,
        # with the server's mirror of the copy as error feedback (needs dtype float32).
        "compress_pull": (_compress, "none"),
        # The job's first steps push uncompressed (pushes only; pulls follow compress_pull).
        "compress_warmup_steps": (_int(0, MAX_STEPS), 0),
        # ... or in this encoding, with error feedback of their own: "none" (the dtype above),
        # or topk[:RATIO], int8[:BLOCK], sign[:BLOCK] (docs/network.md, "The text target").
        "compress_warmup": (_compress, "none"),
        # Overlap the wire with compute (docs/network.md, "Overlap"): buckets of the gradient
        # pushed while backward runs, the forward started on weights as they land. Off by
        # default: on loopback with torch on every core it slowed 10M steps (bench.step).
        "overlap": (_bool, False),
        # A bucket of the overlapped push closes at this many bytes of gradient.
        "bucket_bytes": (_int(4096, 1 << 30), 4 * 1024 * 1024),
    },
    "stop": {
        "max_steps": (_int(0, MAX_STEPS), 0),
        "max_epochs": (_float(0.0, MAX_EPOCHS), 0.0),
        "target": {
            "metric": (_choice(tuple(METRICS)), "accuracy"),
            "value": (_float(0.0, FP32_MAX), None),  # losses are >= 0, accuracy <= 1
        },
        "patience": (_int(0, MAX_STEPS), 0),
        "min_delta": (_float(0.0, FP32_MAX), 0.0),
        "eval_every": (_int(1, MAX_STEPS), 100),
    },
    "checkpoint": {
        "every_steps": (_int(0, MAX_STEPS), 0),
        "keep": (_int(1, 1000), 3),
        # Compressed sync jobs: the newest checkpoint versions whose residuals and momenta
        # each worker keeps in memory, so that a rollback to one replays bitwise.
        "worker_copies": (_int(0, 8), 2),
    },
    # The model's embedding tables (docs/tables.md): these settings for every table, and
    # per_table: {module path: {some of them}} overriding them for one table.
    "tables": {**TABLE_SETTINGS, "per_table": (_kwargs, {})},
}


# -- the normalised spec's type ------------------------------------------------------------
# What parse_spec returns, section by section: the SCHEMA's keys (a unit test checks that the
# two agree) with the types their checks return. Read-only: a spec is shared (the coordinator's
# Job, a worker's trainer), so code that needs another spec parses or validates a new one.


class ModelSpec(TypedDict):
    name: ReadOnly[str]  # a built-in model or "package.module:factory"
    kwargs: ReadOnly[dict[str, object]]  # passed to the factory as they are


class FilesSpec(TypedDict):
    path: ReadOnly[str]  # a directory (its manifest or *.npy) or a glob; "" unless dataset files
    format: ReadOnly[str]  # one of FILE_FORMATS
    test: ReadOnly[str]  # held-out files; "" = the last `holdout` of path
    holdout: ReadOnly[int]
    prefetch: ReadOnly[int]  # batches read ahead per worker
    skip_bad: ReadOnly[bool]  # leave a bad file out instead of failing the job


class DataSpec(TypedDict):
    dataset: ReadOnly[str]  # a built-in dataset or "package.module:factory"
    batch_size: ReadOnly[int]
    shuffle: ReadOnly[bool]
    kwargs: ReadOnly[dict[str, object]]
    files: ReadOnly[FilesSpec]  # dataset "files" (docs/data.md)


class ScheduleSpec(TypedDict):
    name: ReadOnly[str]  # one of SCHEDULES
    warmup_steps: ReadOnly[int]
    total_steps: ReadOnly[int]
    min_lr: ReadOnly[float]


class OptimizerSpec(TypedDict):
    name: ReadOnly[str]  # one of OPTIMIZERS
    lr: ReadOnly[float]
    betas: ReadOnly[list[float]]  # two
    eps: ReadOnly[float]
    weight_decay: ReadOnly[float]
    clip_grad_norm: ReadOnly[float]  # 0: no clipping
    freeze_variance_after: ReadOnly[int]  # 0: plain Adam throughout
    precondition_pushes: ReadOnly[bool]  # after the freeze, pushes are g / D
    worker_momentum: ReadOnly[bool]  # with precondition_pushes: the workers' momenta of g / D
    schedule: ReadOnly[ScheduleSpec]


class ConsistencySpec(TypedDict):
    mode: ReadOnly[str]  # one of CONSISTENCY_MODES
    staleness: ReadOnly[int]


class ClusterSpec(TypedDict):
    servers: ReadOnly[int]
    workers: ReadOnly[int]
    replicas: ReadOnly[int]
    shards: ReadOnly[int]  # filled in as cluster.servers when the spec leaves it out


class TransportSpec(TypedDict):
    dtype: ReadOnly[str]  # one of TRANSPORT_DTYPES
    chunk_bytes: ReadOnly[int]
    compress: ReadOnly[str]  # "none" or a proto/compress.py setting (`compress.parse`)
    compress_pull: ReadOnly[str]  # the same, for pulls (deltas against the worker's copy)
    compress_warmup_steps: ReadOnly[int]  # steps 0..N-1 push uncompressed (or compress_warmup)
    compress_warmup: ReadOnly[str]  # those steps' encoding: none, topk[:R], int8[:B], sign[:B]
    overlap: ReadOnly[bool]  # buckets pushed during backward, pulls landing during forward
    bucket_bytes: ReadOnly[int]  # the overlapped push's buckets close at this size


class TargetSpec(TypedDict):
    metric: ReadOnly[str]  # a key of METRICS
    value: ReadOnly[float]


class StopSpec(TypedDict):
    max_steps: ReadOnly[int]  # 0: no limit
    max_epochs: ReadOnly[float]  # 0: no limit
    target: ReadOnly[TargetSpec | None]  # None: no target
    patience: ReadOnly[int]
    min_delta: ReadOnly[float]
    eval_every: ReadOnly[int]


class CheckpointSpec(TypedDict):
    every_steps: ReadOnly[int]  # 0: never
    keep: ReadOnly[int]
    worker_copies: ReadOnly[int]  # 0: none


class TableSettings(TypedDict):
    optimizer: ReadOnly[str]  # one of TABLE_OPTIMIZERS
    lr: ReadOnly[float]  # 0: optimizer.lr
    eps: ReadOnly[float]  # 0: optimizer.eps
    weight_decay: ReadOnly[float]  # adagrad: L2 added to the row gradient
    initial_accumulator_value: ReadOnly[float]  # adagrad
    admit_after: ReadOnly[int]  # dynamic tables: sightings before an id gets a row
    evict_after_steps: ReadOnly[int]  # dynamic: evict rows untouched this long; 0 = never
    max_rows: ReadOnly[int]  # dynamic: rows per server; 0 = no cap
    max_bytes: ReadOnly[int]  # dynamic: bytes per server; 0 = no cap
    sketch_width: ReadOnly[int]  # dynamic: admission counters per sketch row (power of 2)
    sketch_depth: ReadOnly[int]  # dynamic: admission sketch rows
    sketch_halve_every: ReadOnly[int]  # dynamic: halve admission counts every n steps; 0 = never


class TablesSpec(TableSettings):
    # module path -> that table's settings: the job-wide ones above, overridden by the
    # entry's keys (normalised: every key present).
    per_table: ReadOnly[dict[str, TableSettings]]


class JobSpec(TypedDict):
    """A normalised job spec (parse_spec, validate): every key present, defaults filled in."""

    name: ReadOnly[str]
    seed: ReadOnly[int]
    model: ReadOnly[ModelSpec]
    data: ReadOnly[DataSpec]
    optimizer: ReadOnly[OptimizerSpec]
    consistency: ReadOnly[ConsistencySpec]
    cluster: ReadOnly[ClusterSpec]
    transport: ReadOnly[TransportSpec]
    stop: ReadOnly[StopSpec]
    checkpoint: ReadOnly[CheckpointSpec]
    tables: ReadOnly[TablesSpec]


def _apply(schema: dict[str, Any], data: Any, prefix: str) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(prefix.rstrip("."), f"must be a mapping, got {show(data)}")
    unknown = [k for k in data if k not in schema]
    if unknown:
        name = unknown[0] if isinstance(unknown[0], str) else show(unknown[0])
        if len(name) > MAX_SHOWN:
            name = name[: MAX_SHOWN - 3] + "..."
        raise SpecError(f"{prefix}{name}", f"unknown key (allowed here: {', '.join(schema)})")
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


def validate(raw: Any, clamped: list[str] | None = None) -> JobSpec:
    """Validates a spec given as a (YAML-loaded) mapping; returns the normalised spec.

    With `clamped` (a list), numbers out of their range are clamped into it, each noted in
    the list, rather than refused (other problems are still refused).
    """
    token = _clamping.set(clamped)
    try:
        spec = _apply(SCHEMA, raw, "")
        spec["tables"]["per_table"] = _per_table(spec["tables"])
    finally:
        _clamping.reset(token)
    stop = spec["stop"]
    if stop["target"]["value"] is None:
        stop["target"] = None
    if not (stop["max_steps"] or stop["max_epochs"] or stop["target"]):
        raise SpecError("stop", "needs at least one of max_steps, max_epochs or target.value")
    if stop["target"] and stop["target"]["metric"] in ("accuracy", "auc") and stop["target"]["value"] > 1:
        raise SpecError("stop.target.value", f"{stop['target']['metric']} is a fraction in [0, 1]")
    if stop["target"] and stop["target"]["metric"] == "perplexity" and stop["target"]["value"] < 1:
        raise SpecError("stop.target.value", "perplexity is at least 1")
    _check_files(spec["data"])
    opt = spec["optimizer"]
    sched = opt["schedule"]
    if sched["name"] == "cosine":
        horizon = sched["total_steps"] or stop["max_steps"]
        if not horizon:
            raise SpecError("optimizer.schedule.total_steps",
                            "cosine needs total_steps or stop.max_steps")
        if horizon <= sched["warmup_steps"]:
            raise SpecError("optimizer.schedule.warmup_steps",
                            f"cosine needs more steps than its warmup ({horizon} <= "
                            f"{sched['warmup_steps']})")
    if sched["min_lr"] > opt["lr"]:
        raise SpecError("optimizer.schedule.min_lr", "must not exceed optimizer.lr")
    if opt["name"] == "adamw" and opt["lr"] * opt["weight_decay"] > 1:
        # Decoupled decay scales every weight by 1 - lr * weight_decay per step.
        raise SpecError("optimizer.weight_decay",
                        f"adamw needs lr * weight_decay <= 1, got {opt['lr'] * opt['weight_decay']:g}")
    _check_table_settings(spec["tables"], "tables.")
    mode = spec["consistency"]["mode"]
    if mode != "ssp" and spec["consistency"]["staleness"]:
        raise SpecError("consistency.staleness", f"only applies to mode ssp, not {mode}")
    cluster = spec["cluster"]
    if cluster["replicas"] > cluster["servers"]:
        raise SpecError("cluster.replicas", f"each copy of a shard needs a server of its own: "
                                            f"{cluster['replicas']} > cluster.servers "
                                            f"{cluster['servers']}")
    if cluster["shards"] is None:
        cluster["shards"] = cluster["servers"]
    if cluster["shards"] < cluster["servers"]:
        raise SpecError("cluster.shards", f"each server needs a shard of its own: "
                                          f"{cluster['shards']} < cluster.servers "
                                          f"{cluster['servers']}")
    _check_transport(spec["transport"])
    _check_preconditioned(spec["optimizer"], spec["transport"])
    return cast(JobSpec, spec)  # built by the SCHEMA, which JobSpec mirrors


def _check_transport(transport: dict[str, Any]) -> None:
    """The transport settings that depend on one another."""
    if transport["compress_pull"] != "none" and transport["dtype"] != "float32":
        raise SpecError("transport.compress_pull", f"needs dtype float32, not {transport['dtype']}")
    if transport["compress_warmup_steps"] and transport["compress"] == "none":
        raise SpecError("transport.compress_warmup_steps", "needs transport.compress, not none")
    if transport["compress_warmup"] != "none" and not transport["compress_warmup_steps"]:
        raise SpecError("transport.compress_warmup", "needs transport.compress_warmup_steps > 0")


def _check_preconditioned(opt: dict[str, Any], transport: dict[str, Any]) -> None:
    """optimizer.precondition_pushes needs compressed pushes whose warm-up ends where the
    variance freezes: a preconditioned push must never reach a shard that is not frozen.
    optimizer.worker_momentum needs precondition_pushes (so all of that too)."""
    if opt["worker_momentum"] and not opt["precondition_pushes"]:
        raise SpecError("optimizer.worker_momentum", "needs optimizer.precondition_pushes: true")
    if not opt["precondition_pushes"]:
        return
    if transport["compress"] == "none":
        raise SpecError("optimizer.precondition_pushes", "needs transport.compress, not none")
    if not opt["freeze_variance_after"]:
        raise SpecError("optimizer.precondition_pushes", "needs optimizer.freeze_variance_after > 0")
    if transport["compress_warmup_steps"] != opt["freeze_variance_after"]:
        raise SpecError("optimizer.precondition_pushes",
                        f"needs transport.compress_warmup_steps ({transport['compress_warmup_steps']}) "
                        f"equal to optimizer.freeze_variance_after ({opt['freeze_variance_after']})")


def _per_table(tables: dict[str, Any]) -> dict[str, Any]:
    """tables.per_table normalised: each entry the job-wide settings with its own keys over
    them, checked as the job-wide ones are."""
    base = {k: v for k, v in tables.items() if k != "per_table"}
    out = {}
    for name, entry in tables["per_table"].items():
        key = f"tables.per_table.{name if len(name) <= MAX_SHOWN else name[:MAX_SHOWN] + '...'}"
        if not names.is_valid(name):
            raise SpecError(key, f"a table is named by its module path: "
                                 f"{names.RULE.format(n=names.MAX_LEN)}")
        if entry is not None and not isinstance(entry, dict):
            raise SpecError(key, f"must be a mapping, got {show(entry)}")
        own = {k: v for k, v in (entry or {}).items() if v is not None}
        settings = _apply(TABLE_SETTINGS, {**base, **own}, f"{key}.")
        _check_table_settings(settings, f"{key}.")
        out[name] = settings
    return out


def _check_table_settings(settings: dict[str, Any], prefix: str) -> None:
    if 0 < settings["eps"] < MIN_EPS:
        raise SpecError(f"{prefix}eps", f"must be 0 (the job's) or at least {MIN_EPS:g}, got "
                                        f"{settings['eps']:g}")
    width = settings["sketch_width"]
    if width & (width - 1):
        raise SpecError(f"{prefix}sketch_width", f"must be a power of two, got {width}")


def table_settings(spec: JobSpec, table: str) -> TableSettings:
    """The settings of the table at module path `table`: its per_table entry, else the
    job-wide ones."""
    tables = spec["tables"]
    entry = tables["per_table"].get(table)
    if entry is not None:
        return entry
    return cast(TableSettings, {k: v for k, v in tables.items() if k != "per_table"})


def _check_files(data: dict[str, Any]) -> None:
    """data.files is used by dataset "files" alone, which needs its path (test or holdout)."""
    files = data["files"]
    if data["dataset"] != "files":
        if files["path"] or files["test"]:
            key = "data.files.path" if files["path"] else "data.files.test"
            raise SpecError(key, f"only applies to dataset files, not {show(data['dataset'])}")
        return
    if not files["path"]:
        raise SpecError("data.files.path", "is required for dataset files (a directory or a glob)")
    if not files["test"] and not files["holdout"]:
        raise SpecError("data.files.test", "dataset files needs test files or holdout >= 1")


# -- reading YAML within bounds ----------------------------------------------------------------


class _Refused(Exception):
    """A document beyond a limit (the message says which and where)."""


class _Bounded(Composer):
    """YAML's composer with the spec's limits, checked on each node before it is composed:
    no anchors or aliases, at most MAX_DEPTH levels of collections and MAX_NODES nodes."""

    _spec_depth = 0
    _spec_nodes = 0
    if TYPE_CHECKING:  # the parser's, which every loader mixes in
        def peek_event(self) -> Event: ...

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        mark = event.start_mark
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(f"YAML anchors and aliases are not allowed in a job spec ({_where(mark)})")
        self._spec_nodes += 1
        if self._spec_nodes > MAX_NODES:
            raise _Refused(f"a job spec may hold at most {MAX_NODES} values ({_where(mark)})")
        if not isinstance(event, CollectionStartEvent):
            return super().compose_node(parent, index)
        if self._spec_depth >= MAX_DEPTH:
            raise _Refused(_too_deep(mark))
        self._spec_depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._spec_depth -= 1


class _PyLoader(_Bounded, yaml.SafeLoader):
    """The safe loader, bounded; pure Python."""


if getattr(yaml, "__with_libyaml__", False):
    from yaml._yaml import CParser

    class _CLoader(_Bounded, CParser, SafeConstructor, Resolver):
        """The safe loader, bounded, with libyaml's scanner and parser (5-10x faster). The
        Python composer comes first in the MRO, so every node passes _Bounded."""

        def __init__(self, stream: str):
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _Loader: type = _CLoader
else:  # pragma: no cover - PyYAML without libyaml
    _Loader = _PyLoader


def load_yaml(text: str, loader: type | None = None) -> Any:
    """The YAML document in `text` within the spec's limits (size, aliases, depth, values);
    raises SpecError otherwise. Used for job specs only."""
    if not isinstance(text, str):
        raise SpecError("", f"a job spec must be text, got {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise SpecError("", f"a job spec may have at most {MAX_SPEC_BYTES} bytes, this one has "
                            f"{size}")
    reader = (loader or _Loader)(text)
    try:
        return reader.get_single_data()
    except _Refused as exc:
        raise SpecError("", str(exc)) from None
    except yaml.YAMLError as exc:
        raise SpecError("", _depth_refusal(exc) or f"not valid YAML: {exc}") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an int of 5000 digits
        raise SpecError("", f"not valid YAML: {exc}") from None
    finally:
        reader.dispose()


def _depth_refusal(exc: yaml.YAMLError) -> str | None:
    """The spec's own depth message for libyaml's nesting limit (the C scanner of PyYAML
    6.0.4 stops at 1000 flow levels while reading ahead, before the composer counts 33),
    so the refusal reads the same whichever PyYAML is installed; None for any other error."""
    if getattr(exc, "problem", None) != "exceeded maximum nesting depth":
        return None
    return _too_deep(getattr(exc, "problem_mark", None))


def _where(mark: Any) -> str:
    """A YAML mark as the spec's messages give it (computed only for a refusal)."""
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"


def _too_deep(mark: Any) -> str:
    return f"a job spec may nest at most {MAX_DEPTH} levels ({_where(mark)})"


def parse_spec(text: str, clamped: list[str] | None = None) -> JobSpec:
    """Parses and validates YAML spec text; raises SpecError with the key at fault.

    `clamped`: see `validate` (for specs an older version stored, never for a submit).
    """
    raw = load_yaml(text)
    if not isinstance(raw, dict):
        raise SpecError("", "a job spec must be a YAML mapping")
    return validate(raw, clamped)


@dataclass(frozen=True)
class NormalisedSpec:
    """A validated spec (`parse_spec`'s dict) and its canonical YAML `text`."""

    spec: JobSpec
    text: str


def normalise(text: str) -> NormalisedSpec:
    """parse_spec(text) and its canonical YAML, which must be within the limits too: it is what
    the coordinator stores and workers parse, with every default filled in (~50 values) and
    non-ASCII characters escaped (up to 5 bytes for 2)."""
    spec = parse_spec(text)
    canonical = dump_spec(spec)
    try:
        load_yaml(canonical)
    except SpecError as exc:
        raise SpecError("", f"the normalised spec (defaults filled in, as workers read it): "
                            f"{exc}") from None
    return NormalisedSpec(spec, canonical)


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """The safe dumper (libyaml's emitter when there is one, 5x faster) that writes no
    anchors or aliases (which load_yaml refuses), even for an object met twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_spec(spec: JobSpec) -> str:
    """The canonical YAML text of a normalised spec (key order as in SCHEMA)."""
    return yaml.dump(spec, Dumper=_Dumper, sort_keys=False, default_flow_style=None)


def metric_improves(metric: str, new: float, old: float, min_delta: float = 0.0) -> bool:
    """True if `new` beats `old` by more than min_delta in the metric's direction."""
    if METRICS[metric]:
        return new > old + min_delta
    return new < old - min_delta
