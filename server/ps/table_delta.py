"""Incremental captures of fixed embedding tables: a delta is the slots changed since a base
capture and their rows, and applying it to that base gives the full capture, bitwise.

Pure: no files, no locks (TableShard.capture takes them: `changed_only` for a delta,
`new_base` to count changes afresh from a full capture). A delta is a TableState whose
tensors are "slots" (int64 [k], strictly increasing, in [0, rows)) and "weights" [k, dim] and
"state.<name>" [k, ...] of those slots; its optimizer step count, counters and config are the
table's at the delta's capture. Dynamic tables are always captured in full (their rows move
between slots on eviction, and ids come and go).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .table_config import TableState

SLOTS = "slots"


def is_delta(state: TableState) -> bool:
    return SLOTS in state.tensors


def apply_delta(base: TableState, delta: TableState) -> TableState:
    """The full capture that `delta` describes on top of the full capture `base` (new
    tensors; neither argument changes). Raises ValueError naming the table and what does not
    fit: another table, a base that is itself a delta, other tensors, slots out of order or
    range, rows of another shape or dtype."""
    where = f"table {base.config.name!r}"
    if delta.config.name != base.config.name or not base.config.fixed:
        raise ValueError(f"{where}: a delta applies to a full capture of the same fixed table")
    if is_delta(base) or not is_delta(delta):
        raise ValueError(f"{where}: the base must be a full capture and the delta a delta")
    if set(delta.tensors) - {SLOTS} != set(base.tensors):
        raise ValueError(f"{where}: delta tensors {sorted(delta.tensors)}, base "
                         f"{sorted(base.tensors)}")
    slots, rows = delta.tensors[SLOTS], base.tensors["weights"].shape[0]
    if slots.dtype != torch.int64 or slots.dim() != 1:
        raise ValueError(f"{where}: slots are not int64 [k]")
    if slots.numel() and (int(slots[0]) < 0 or int(slots[-1]) >= rows
                          or bool((slots[1:] <= slots[:-1]).any())):
        raise ValueError(f"{where}: slots not strictly increasing in [0, {rows})")
    tensors = {}
    for key, full in base.tensors.items():
        part = delta.tensors[key]
        if part.dtype != full.dtype or part.shape != (slots.numel(), *full.shape[1:]):
            raise ValueError(f"{where}: delta {key} is {part.dtype} {tuple(part.shape)}")
        tensors[key] = full.clone().index_copy_(0, slots, part)
    return replace(delta, tensors=tensors)


def take_delta(changed: int, rows: int, deltas_since_full: int, full_every: int) -> bool:
    """Whether the next capture of a fixed table of `rows` rows, `changed` of them changed
    since its base, is a delta: when at most half the rows changed (a larger delta saves
    little and costs a read of both) and fewer than `full_every` - 1 deltas follow the base
    (a full capture every `full_every` bounds what a restore reads and applies)."""
    return full_every > 1 and 2 * changed <= rows and deltas_since_full < full_every - 1
