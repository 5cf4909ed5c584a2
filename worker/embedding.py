"""Embedding tables a parameter server holds: `Embedding` and `EmbeddingBag` for model factories.

They are torch.nn.Embedding and torch.nn.EmbeddingBag (subclasses, the same constructor and
call signatures), and until a row source is attached they are exactly those modules: same
parameters from the same seed, same forward, same gradients, same state_dict.

`attach(source, table)` moves the table's rows off the worker: the module gives up its `weight`
parameter (returned, so that the initial rows can seed the servers) and from then on each
forward
  1. takes the unique ids of its input (sorted) and asks the source for those rows, one call
     for the batch: `source.fetch(table, ids) -> rows [len(ids), dim]`;
  2. runs torch's own F.embedding / F.embedding_bag on those rows, with the input's ids
     replaced by their positions among the unique ids (so every option - offsets,
     per_sample_weights, sum/mean pooling, padding_idx, include_last_offset,
     scale_grad_by_freq - means what it means in torch), with a sparse gradient (a dense one
     over the fetched rows with scale_grad_by_freq, for which torch has no sparse gradient);
and after backward `take_row_grads()` hands back the table's gradient as coalesced
(ids, rows): exactly the values torch.optim.SparseAdam would see for the same batch from a
`sparse=True` module (torch coalesces its sparse gradient the same way), with padding rows
left out as torch leaves them out. docs/tables.md has the model.

On a CUDA input, fetched rows reach the device through the module's pinned staging buffer
and the row gradient comes back through another (worker/staging.py); on the CPU, and without
CUDA, they are used where they are.

`Embedding(None, dim)` is a dynamic table: any int64 id, rows created by the servers (see
proto.tables.init_rows and `init`); it has no weight and needs a source before forward. Its
`padding_idx` is an id like any other (not counted from the end): it always reads as zeros and
is neither fetched nor created.

Not supported once attached (NotImplementedError at `attach`): `max_norm` (torch renormalises
the weight in place during forward; the servers would not see it) and EmbeddingBag's "max"
mode (torch has no sparse gradient for it).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from shardps.proto import tables as tables_lib
from shardps.proto.tables import RowInit
from shardps.worker.staging import Staging

__all__ = ["Embedding", "EmbeddingBag", "RowSource", "table_modules"]


class RowSource(Protocol):
    """Where an attached table's rows come from (the trainer's client to the servers, or an
    in-process store in tests)."""

    def fetch(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The rows [len(ids), dim] (fp32, CPU) of strictly increasing int64 `ids`."""
        ...


class _Table:
    """What Embedding and EmbeddingBag share: the attached path."""

    # Declared for the type checker; torch's classes set them (Any: theirs say int, Parameter).
    num_embeddings: Any  # int, or None for a dynamic table
    weight: Any  # nn.Parameter, or None for a dynamic or attached table
    embedding_dim: int
    padding_idx: int | None
    max_norm: float | None
    _parameters: Any


    def _init_dynamic(self, embedding_dim: int, weight: torch.Tensor | None, padding_idx: int | None,
                      max_norm: float | None, norm_type: float, scale_grad_by_freq: bool,
                      sparse: bool) -> None:
        """The attributes torch's __init__ would set, for a dynamic table (no weight)."""
        nn.Module.__init__(self)  # type: ignore[arg-type]
        if weight is not None:
            raise ValueError("a dynamic table has no weight")
        self.num_embeddings = None
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm, self.norm_type = max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        self.register_parameter("weight", None)  # type: ignore[attr-defined]
    @staticmethod
    def _weight_device(init: RowInit | None, weight: torch.Tensor | None, device: Any) -> Any:
        """Where torch's __init__ builds the weight: nowhere ("meta") for a server-initialised
        fixed table, which then drops it."""
        if init is None:
            return device
        if weight is not None:
            raise ValueError("a fixed table starts from its weight or from init, not both")
        return "meta"

    def _init_table(self, init: RowInit | None) -> None:
        self.init: RowInit | None = (init or RowInit()) if self.num_embeddings is None else init
        # A server-initialised fixed table: rows init_rows(seed, table, id), built on the servers
        # (or by `materialize` in one process). The seed is the one torch was given before the
        # model was built: the job's seed on a worker.
        self.init_seed = tables_lib.int64_of(torch.initial_seed())
        if self.server_init:
            self.register_parameter("weight", None)  # type: ignore[attr-defined]
        self._source: RowSource | None = None
        self.table: str | None = None
        self._trainable = True
        self._fetched: list[tuple[torch.Tensor, torch.Tensor, int | None]] = []  # ids, rows, padding
        self._rows_in, self._grads_out = Staging(), Staging()  # host <-> device (CUDA inputs)

    @property
    def dynamic(self) -> bool:
        return self.num_embeddings is None

    @property
    def server_init(self) -> bool:
        """A fixed table whose rows start on the servers (built with `init`)."""
        return self.num_embeddings is not None and self.init is not None

    @property
    def attached(self) -> bool:
        return self._source is not None

    def _check_attachable(self) -> None:
        if self.max_norm is not None:
            raise NotImplementedError("max_norm is not supported on a server-held table "
                                      "(torch renormalises rows in place during forward)")

    def attach(self, source: RowSource, table: str) -> torch.Tensor | None:
        """Takes the rows from `source` as table `table` from now on. Returns the weight it
        gave up (a fixed table's initial rows, detached), or None for a dynamic table."""
        self._check_attachable()
        if self.attached:
            raise RuntimeError(f"table {self.table!r} is already attached")
        weight = self.weight
        if weight is not None:
            self._trainable = weight.requires_grad
            self._parameters["weight"] = None  # no longer a parameter
        self._source, self.table = source, table
        self._fetched = []
        return None if weight is None else weight.detach()

    def _rows_for(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """(input as positions among its unique ids, their rows, padding_idx among them)."""
        assert self._source is not None and self.table is not None
        flat = input.reshape(-1)
        tables_lib.check_ids(self.table, flat, self.num_embeddings)
        ids, inverse = torch.unique(flat.to(device="cpu", dtype=torch.int64), sorted=True,
                                    return_inverse=True)
        padding = present = None
        if self.padding_idx is not None:
            at = int(torch.searchsorted(ids, self.padding_idx))
            present = at < ids.numel() and int(ids[at]) == self.padding_idx
            # Absent from the batch, padding still goes to torch, as an extra zero row no index
            # points at: torch's kernels take another path with a padding index than without
            # (one that rounds differently), and the results must be torch's bit for bit.
            padding = at if present else ids.numel()
        fetch = ids
        if self.dynamic and present and padding is not None:
            fetch = torch.cat([ids[:padding], ids[padding + 1 :]])
        rows = self._source.fetch(self.table, fetch)
        if rows.shape != (fetch.numel(), self.embedding_dim):
            raise RuntimeError(f"table {self.table!r}: the row source gave {tuple(rows.shape)} "
                               f"for {fetch.numel()} ids of dim {self.embedding_dim}")
        if padding is not None and (fetch is not ids or not present):  # a zero row at `padding`
            rows = torch.cat([rows[:padding], rows.new_zeros(1, self.embedding_dim), rows[padding:]])
        rows = self._rows_in.to_device(rows.to(torch.float32), input.device)
        if self._trainable and torch.is_grad_enabled():
            rows.requires_grad_(True)
            self._fetched.append((ids, rows, padding))
        return inverse.to(input.device).view(input.shape).to(input.dtype), rows, padding

    def take_row_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The table's gradient since the last call, coalesced: (strictly increasing int64 ids,
        rows [n, dim] fp32), both on CPU; None if no forward reached backward (torch's grad
        would be None, and SparseAdam would not count a step). Empty ids when every id was
        padding. Forgets the batches it read."""
        parts = []
        for ids, rows, padding in self._fetched:
            grad = rows.grad
            if grad is None:
                continue
            if grad.is_sparse:
                parts.append((ids[grad._indices()[0].cpu()], grad._values()))
            else:  # scale_grad_by_freq: a dense gradient over the fetched rows, padding left out
                keep = torch.arange(ids.numel())
                if padding is not None and padding < ids.numel():
                    keep = keep[keep != padding]
                parts.append((ids[keep], grad[keep.to(grad.device)]))
        self._fetched = []
        if not parts:
            return None
        every = torch.unique(torch.cat([ids for ids, _ in parts]))
        # One sparse tensor over the union of the batches' ids, entries in the order torch
        # accumulates them; the map from ids to positions keeps their order, so coalescing
        # sums each row's entries exactly as torch's coalesce of the whole table would.
        indices = torch.cat([torch.searchsorted(every, ids) for ids, _ in parts])
        # One copy to the host for all the batches' rows (through pinned memory on CUDA).
        values = self._grads_out.to_host(torch.cat([values for _, values in parts]))
        grad = torch.sparse_coo_tensor(indices[None], values, (every.numel(), self.embedding_dim),
                                       check_invariants=False).coalesce()
        return every[grad.indices()[0]], grad.values()

    def _refuse_local(self) -> None:
        if self.server_init:
            raise RuntimeError(f"a server-initialised table ({self.num_embeddings} rows, built "
                               "with init=) has no weight in this process: attach it to a row "
                               "source, or build its weight with "
                               "shardps.worker.tableinit.materialize(model)")
        raise RuntimeError("a dynamic table (num_embeddings=None) has no weight of its own: "
                           "attach a row source first")


class Embedding(_Table, nn.Embedding):
    """torch.nn.Embedding whose rows a parameter server can hold; `num_embeddings=None` makes
    a dynamic table (any int64 id) with rows starting as `init` (default N(0, 1))."""

    def __init__(self, num_embeddings: int | None, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: torch.Tensor | None = None, _freeze: bool = False,
                 device=None, dtype=None, *, init: RowInit | None = None) -> None:
        if num_embeddings is None:
            self._init_dynamic(embedding_dim, _weight, padding_idx, max_norm, norm_type,
                               scale_grad_by_freq, sparse)
        else:  # with `init`, a server-initialised table: torch's checks, no weight built
            device = self._weight_device(init, _weight, device)
            super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                             scale_grad_by_freq, sparse, _weight, _freeze, device, dtype)
        self._init_table(init)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            super().reset_parameters()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._source is None:
            if self.weight is None:
                self._refuse_local()
            return super().forward(input)
        local, rows, padding = self._rows_for(input)
        return F.embedding(local, rows, padding, None, self.norm_type, self.scale_grad_by_freq,
                           sparse=not self.scale_grad_by_freq)


class EmbeddingBag(_Table, nn.EmbeddingBag):
    """torch.nn.EmbeddingBag whose rows a parameter server can hold; `num_embeddings=None`
    makes a dynamic table (any int64 id) with rows starting as `init` (default N(0, 1))."""

    def __init__(self, num_embeddings: int | None, embedding_dim: int, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                 sparse: bool = False, _weight: torch.Tensor | None = None,
                 include_last_offset: bool = False, padding_idx: int | None = None,
                 device=None, dtype=None, *, init: RowInit | None = None) -> None:
        if num_embeddings is None:
            self._init_dynamic(embedding_dim, _weight, padding_idx, max_norm, norm_type,
                               scale_grad_by_freq, sparse)
            self.mode, self.include_last_offset = mode, include_last_offset
        else:  # with `init`, a server-initialised table: torch's checks, no weight built
            device = self._weight_device(init, _weight, device)
            super().__init__(num_embeddings, embedding_dim, max_norm, norm_type, scale_grad_by_freq,
                             mode, sparse, _weight, include_last_offset, padding_idx, device, dtype)
        self._init_table(init)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            super().reset_parameters()

    def _check_attachable(self) -> None:
        super()._check_attachable()
        if self.mode == "max":
            raise NotImplementedError("EmbeddingBag mode 'max' is not supported on a server-held "
                                      "table (torch has no sparse gradient for it)")

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self._source is None:
            if self.weight is None:
                self._refuse_local()
            return super().forward(input, offsets, per_sample_weights)
        local, rows, padding = self._rows_for(input)
        return F.embedding_bag(local, rows, offsets, None, self.norm_type, self.scale_grad_by_freq,
                               self.mode, not self.scale_grad_by_freq, per_sample_weights,
                               self.include_last_offset,
                               padding)


def table_modules(model: nn.Module) -> list[tuple[str, Embedding | EmbeddingBag]]:
    """The model's tables with their module paths (a table's name), in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Embedding | EmbeddingBag)]
