"""Layouts: how a model's parameters map onto one flat fp32 vector, and back.

Workers build a layout from their model; the coordinator stores it with the job so that a
client can turn exported flat weights back into a state_dict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from shardps.proto import common_pb2, names

# torch only in annotations: the coordinator imports this module and never needs torch, which
# would cost it about 1 s of CPU at start (bench/RESULTS.md, tta).
if TYPE_CHECKING:
    import torch


def make_layout(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> common_pb2.Layout:
    """Lays parameters out contiguously in the given order."""
    layout = common_pb2.Layout()
    offset = 0
    digest = hashlib.sha256()
    for name, shape in named_shapes:
        shape = tuple(int(d) for d in shape)
        layout.params.add(name=name, shape=shape, offset=offset)
        offset += _numel(shape)
        digest.update(f"{name}:{','.join(map(str, shape))};".encode())
    layout.total = offset
    layout.fingerprint = digest.hexdigest()[:16]
    return layout


def layout_of(module: torch.nn.Module) -> common_pb2.Layout:
    """The layout of a module's parameters in named_parameters() order."""
    return make_layout((name, tuple(p.shape)) for name, p in module.named_parameters())


def check_layout(layout: common_pb2.Layout) -> None:
    """Raises ValueError unless the layout is contiguous, non-empty and self-consistent."""
    if not layout.params:
        raise ValueError("layout has no parameters")
    offset = 0
    seen = set()
    for p in layout.params:
        if p.name in seen:
            raise ValueError(f"layout names {p.name!r} twice")
        seen.add(p.name)
        if any(d < 0 for d in p.shape):
            raise ValueError(f"layout parameter {p.name!r} has a negative dimension")
        if p.offset != offset:
            raise ValueError(f"layout parameter {p.name!r} at offset {p.offset}, expected {offset}")
        offset += _numel(p.shape)
    if offset != layout.total:
        raise ValueError(f"layout total {layout.total} != sum of parameter sizes {offset}")
    expected = make_layout((p.name, tuple(p.shape)) for p in layout.params).fingerprint
    if layout.fingerprint != expected:
        raise ValueError("layout fingerprint does not match its parameters")
    tables: set[str] = set()
    for i, table in enumerate(layout.tables):
        if not names.is_valid(table):
            raise ValueError(f"layout.tables[{i}]: a table is named by its module path: "
                             f"{names.RULE.format(n=names.MAX_LEN)}")
        if table in tables:
            raise ValueError(f"layout.tables names {table!r} twice")
        tables.add(table)


def unflatten(flat: torch.Tensor, layout: common_pb2.Layout) -> dict[str, torch.Tensor]:
    """Splits a flat vector into a state_dict of independent tensors (each owns its storage)."""
    if flat.numel() != layout.total:
        raise ValueError(f"flat vector has {flat.numel()} elements, layout needs {layout.total}")
    return {
        p.name: flat[p.offset : p.offset + _numel(p.shape)].view(tuple(p.shape)).clone()
        for p in layout.params
    }


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
