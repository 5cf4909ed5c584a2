"""The embedding tables' part of a shard checkpoint: what checkpoint.py writes for each table
beside the dense tensors, and what it must find there on read.

Pure: no gRPC, no threads, no files (checkpoint.py reads and writes them). Table `i` of the
ShardConfig keeps each tensor of its capture (TableShard.capture) in `table-<i>.<key>.bin`;
the manifest's `tables` list holds one entry per table, in the config's order (its name, step
count, counters, the sketch's last halving and the file entries), and `table_applied` the
async applied-push table of rows, [[worker, table, step], ...].

Which tensors a table has, their dtypes and shapes follow from its TableSpec in the
checkpoint's validated ShardConfig, never from the manifest (a dynamic table's row count
excepted, bounded). Values are checked as a restore needs them: finite rows and optimizer
state, second moments and accumulators never negative, a dynamic table's ids strictly
increasing and all of this server, last-touched steps within the table's steps.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from shardps.proto import names, ps_pb2
from shardps.proto import tables as tables_lib
from shardps.proto.tables import FixedLayout

from .table_config import TableConfig, TableState, TableStats
from .table_optim import RowOptimizer
from .tables import make_optimizer, table_config

ENTRY_KEYS = frozenset({"name", "steps", "counters", "halved_at", "files"})
# TableStats' counters (the sizes are not state): what a capture's counters may hold.
COUNTERS = frozenset(f.name for f in fields(TableStats)) - {"rows", "capacity", "bytes", "steps"}
# Optimizer state that only ever grows from 0 (it may overflow to inf, never go negative).
NON_NEGATIVE = frozenset({"state.exp_avg_sq", "state.sum"})
MAX_ROWS = 1 << 40       # a dynamic table's rows on one server: far above any real one
MAX_STEP = 2**63 - 1

Wanted = dict[str, tuple[str, list[int]]]  # tensor key -> (dtype, shape)


def file_name(index: int, key: str) -> str:
    """The file stem of table `index`'s tensor `key` ("table-0.state.exp_avg")."""
    return f"table-{index}.{key}"


def entry(state: TableState, files: dict) -> dict:
    """A table's manifest entry, its tensors' file entries given."""
    return {"name": state.config.name, "steps": int(state.optimizer["steps"]),
            "counters": {k: int(v) for k, v in state.counters.items()},
            "halved_at": None if state.sketch is None else int(state.sketch["halved_at"]),
            "files": files}


def applied_entry(applied: dict[tuple[str, str], int]) -> list[list]:
    return [[worker, table, step] for (worker, table), step in sorted(applied.items())]


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        shown = repr(value) if isinstance(value, (int, float)) else names.shown(value)
        raise ValueError(f"{what} {shown} is not an integer in [{lo}, {hi}]")
    return value


def expected(spec: ps_pb2.TableSpec, shard_index: int,
             raw: Any) -> tuple[TableConfig, RowOptimizer, Wanted]:
    """The table's config and optimizer (from its spec) and the tensors its entry must
    describe. Raises ValueError naming the table and what is wrong with the entry."""
    where = f"table {spec.name!r}"
    if not isinstance(raw, dict) or set(raw) != ENTRY_KEYS:
        raise ValueError(f"{where}: entry must have exactly {', '.join(sorted(ENTRY_KEYS))}")
    if raw["name"] != spec.name:
        raise ValueError(f"{where}: entry is of table {names.shown(raw['name'])}")
    if not isinstance(raw["files"], dict):
        raise ValueError(f"{where}: files is not a map")
    config, optimizer = table_config(spec, shard_index), make_optimizer(spec)
    if config.fixed:
        assert config.num_embeddings is not None
        rows = FixedLayout(config.name, config.num_embeddings,
                           config.num_servers).rows_on(config.server_index)
    else:
        weights = raw["files"].get("weights")
        shape = weights.get("shape") if isinstance(weights, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2):
            raise ValueError(f"{where}: weights: no shape [rows, {config.dim}]")
        rows = _int(shape[0], f"{where}: rows", 0, MAX_ROWS)
    want: Wanted = {"weights": ("float32", [rows, config.dim])}
    for key, shape in optimizer.state_shapes(config.dim).items():
        want[f"state.{key}"] = ("float32", [rows, *shape])
    if not config.fixed:
        want["ids"] = want["last"] = ("int64", [rows])
        if config.admit_after > 1:
            want["sketch"] = ("int32", [config.sketch_depth, config.sketch_width])
    unknown = sorted(set(raw["files"]) ^ set(want))
    if unknown:
        raise ValueError(f"{where}: tensor {names.shown(unknown[0])} "
                         f"{'missing' if unknown[0] in want else 'unknown'}")
    return config, optimizer, want


def table_state(config: TableConfig, optimizer: RowOptimizer, raw: dict,
                tensors: dict[str, torch.Tensor]) -> TableState:
    """The TableState of a validated entry (see `expected`) and its tensors, read with the
    dtypes and shapes it wanted. Raises ValueError naming the table and the first bad value."""
    where = f"table {config.name!r}"
    steps = _int(raw["steps"], f"{where}: steps", 0, MAX_STEP)
    counters = raw["counters"]
    if not isinstance(counters, dict) or not set(counters) <= COUNTERS:
        raise ValueError(f"{where}: counters must be a map of {', '.join(sorted(COUNTERS))}")
    for key, value in counters.items():
        _int(value, f"{where}: counters.{key}", 0, MAX_STEP)
    for key, tensor in tensors.items():
        if key == "weights" or key.startswith("state."):
            bad = (bool((tensor < 0).any()) or bool(tensor.isnan().any())
                   if key in NON_NEGATIVE else not bool(torch.isfinite(tensor).all()))
            if tensor.numel() and bad:
                raise ValueError(f"{where}: {key}: non-finite or negative values")
    sketch = None
    if "sketch" in tensors:
        if tensors["sketch"].numel() and bool((tensors["sketch"] < 0).any()):
            raise ValueError(f"{where}: sketch: negative counts")
        sketch = {"width": config.sketch_width, "depth": config.sketch_depth,
                  "halve_every": config.sketch_halve_every,
                  "halved_at": _int(raw["halved_at"], f"{where}: halved_at", 0, steps)}
    elif raw["halved_at"] is not None:
        raise ValueError(f"{where}: halved_at without an admission sketch")
    if "ids" in tensors:
        _check_dynamic(config, tensors["ids"], tensors["last"], steps)
    hyper = {**optimizer.hyper(), "steps": steps}
    return TableState(config, hyper, dict(counters), tensors, sketch)


def _check_dynamic(config: TableConfig, ids: torch.Tensor, last: torch.Tensor,
                   steps: int) -> None:
    where = f"table {config.name!r}"
    try:
        tables_lib.check_ids(config.name, ids, None, unique_sorted=True)
    except ValueError as exc:
        raise ValueError(f"{where}: ids: {exc}") from None
    servers = tables_lib.dynamic_server_of(config.name, ids, config.num_servers)
    if ids.numel() and bool((servers != config.server_index).any()):
        raise ValueError(f"{where}: ids: some are not on server {config.server_index}")
    if last.numel() and (bool((last < 0).any()) or bool((last > steps).any())):
        raise ValueError(f"{where}: last: steps outside [0, {steps}]")


def read_applied(raw: Any, tables: list[str]) -> dict[tuple[str, str], int]:
    """The async applied-push table of rows from its manifest list; ValueError if malformed."""
    if not isinstance(raw, list):
        raise ValueError("table_applied is not a list")
    applied = {}
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and 0 < len(item[0]) <= names.MAX_LEN and item[1] in tables
                and type(item[2]) is int and -1 <= item[2] <= MAX_STEP):
            raise ValueError("table_applied: an entry is not [worker, table, step]")
        applied[(item[0], item[1])] = item[2]
    return applied
