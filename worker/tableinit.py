"""Server-initialised fixed tables in one process: `materialize(model)` builds the weight of
every `Embedding(N, dim, init=...)` / `EmbeddingBag(N, dim, init=...)` of a model, with the
rows the servers would start from (docs/tables.md, "Tables too big for a worker").

Such a table builds no weight when the model is built, so a worker's `model = factory()`
costs nothing for it; on a cluster the servers fill their rows themselves. Without a cluster
(a reference run, a test, a notebook) call `materialize(model)` once after building the
model and before making its optimizer: from then on the table is an ordinary torch module
with an N x dim weight (4 bytes per parameter: a billion-parameter table takes 4 GB).
"""

from __future__ import annotations

from torch import nn

from shardps.proto import tables as tables_lib
from shardps.worker.embedding import table_modules

__all__ = ["materialize"]


def materialize(model: nn.Module, seed: int | None = None) -> list[str]:
    """Gives every server-initialised table of `model` that has no weight yet (and no row
    source) its weight: row `id` is proto.tables.init_rows(seed, path, id), the padding row
    zeros, exactly the rows a job's servers start from. `seed`: the job's seed; default, the
    seed torch had when the module was built (a worker builds the model under the job's
    seed, so the same factory under the same seed gives the same rows). Call it on the model
    the factory returns: a table's name, which its rows depend on, is its path there.
    Returns the paths of the tables built, in module order."""
    built = []
    for path, module in table_modules(model):
        if not module.server_init or module.weight is not None or module.attached:
            continue
        assert module.num_embeddings is not None and module.init is not None
        rows = tables_lib.init_fixed_rows(
            module.init_seed if seed is None else seed, path, module.num_embeddings,
            module.embedding_dim, module.init, padding_idx=module.padding_idx)
        module.weight = nn.Parameter(rows)
        built.append(path)
    return built
