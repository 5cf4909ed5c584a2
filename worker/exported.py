"""Loading what `shardps export` wrote back into the model it came from (docs/tables.md,
"Checkpoints and export").

An export is a state_dict: dense parameters and fixed tables under the model's own keys
(`<module>.weight`), and each dynamic table as a pair `<module>.ids` (int64, strictly
increasing) / `<module>.rows` (fp32 [len(ids), dim]), which no torch module has a parameter
for. `load_exported(model, state_dict)` loads the former with `load_state_dict` and attaches
every dynamic table of the model to an `ExportedRows` holding its pair, so the model runs in
one process without a cluster: an id in the export reads its row, any other id reads as zeros
(what a server answers for an id without a row). For inference and evaluation: gradients of
the attached tables go nowhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shardps.proto import tables as tables_lib
from shardps.worker.embedding import table_modules

__all__ = ["ExportedRows", "load_exported"]


class ExportedRows:
    """A RowSource over exported dynamic tables: table -> (ids ascending, rows). Read-only;
    thread-safe as its tensors are never written."""

    def __init__(self, tables: Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
        """Raises ValueError unless each pair is strictly increasing int64 ids and fp32 rows
        [len(ids), dim], finite."""
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (ids, rows) in tables.items():
            if ids.dtype != torch.int64:
                raise tables_lib.TableRowsError(f"table {name!r}: ids must be int64, got {ids.dtype}")
            tables_lib.check_ids(name, ids, unique_sorted=True)
            if rows.dim() != 2:
                raise tables_lib.TableRowsError(f"table {name!r}: rows must be 2-D, got "
                                                f"{tuple(rows.shape)}")
            tables_lib.check_rows(name, ids, rows, rows.shape[1])
            self.tables[name] = (ids, rows)

    def fetch(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The exported rows of `ids` (strictly increasing int64); zeros for ids not exported."""
        held, rows = self.tables[table]
        out = torch.zeros((ids.numel(), rows.shape[1]), dtype=torch.float32)
        if held.numel() == 0 or ids.numel() == 0:
            return out
        at = torch.searchsorted(held, ids).clamp_(max=held.numel() - 1)
        found = (held.index_select(0, at) == ids).nonzero().flatten()
        out.index_copy_(0, found, rows.index_select(0, at.index_select(0, found)))
        return out


def load_exported(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                  strict: bool = True) -> ExportedRows:
    """Loads an export into `model` (built by the job's model factory): the dense parameters
    and fixed tables by `model.load_state_dict(..., strict)`, the dynamic tables by attaching
    them to the returned ExportedRows.

    Raises:
        KeyError: a dynamic table of the model has no `.ids` / `.rows` pair in the export.
        ValueError: a pair is malformed, or its rows' width is not the module's.
        RuntimeError: load_state_dict's own errors (with strict, unexpected or missing keys).
    """
    rest = dict(state_dict)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dynamic = [(name, m) for name, m in table_modules(model) if m.dynamic]
    for name, module in dynamic:
        if f"{name}.ids" not in rest or f"{name}.rows" not in rest:
            raise KeyError(f"the export has no {name}.ids / {name}.rows for dynamic table {name!r}")
        pairs[name] = (rest.pop(f"{name}.ids"), rest.pop(f"{name}.rows"))
        if pairs[name][1].dim() != 2 or pairs[name][1].shape[1] != module.embedding_dim:
            raise tables_lib.TableRowsError(
                f"table {name!r}: exported rows {tuple(pairs[name][1].shape)} do not have the "
                f"module's width {module.embedding_dim}")
    source = ExportedRows(pairs)
    model.load_state_dict(rest, strict=strict)
    for name, module in dynamic:
        module.attach(source, name)
    return source
