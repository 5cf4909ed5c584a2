"""Gradient clipping by global norm over a step's whole gradient: the dense flat gradient and
every embedding table's row gradient (docs/tables.md), as torch.nn.utils.clip_grad_norm_ over
all the parameters of one process with torch's sparse=True tables would clip them."""

from __future__ import annotations

import torch

from shardps.worker.flat import FlatParams
from shardps.worker.tablesync import TableSync


def clip_grad_norm(flat: FlatParams, tables: TableSync | None, max_norm: float) -> float:
    """Scales the dense gradient and the tables' row gradients by one factor, down to global
    L2 norm `max_norm`; returns the norm before clipping (max_norm <= 0 only measures it).

    The norm is torch's: the L2 norm of the per-part norms (the dense gradient's, then each
    table's coalesced rows'), each part in fp32; the factor is max_norm / (norm + 1e-6),
    applied when below 1. Row gradients are those `TableSync.take_grads` took after backward
    (coalesced, so a row's norm is that of its summed gradient, as torch coalesces a sparse
    gradient before its norm). Without tables this is FlatParams.clip_grad_norm.
    """
    if not tables:
        return flat.clip_grad_norm(max_norm)
    parts = [torch.linalg.vector_norm(flat.grad).cpu()]
    parts += [torch.linalg.vector_norm(rows) for _, rows in tables.take_grads().values()]
    norm = float(torch.linalg.vector_norm(torch.stack(parts)))
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            flat.grad.mul_(coef)
            tables.scale_grads(coef)
    return norm
