"""A table shard's configuration, counters and checkpointed state: plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from shardps.proto.tables import FixedLayout, RowInit

from .table_admission import DEFAULT_DEPTH, DEFAULT_WIDTH


@dataclass(frozen=True)
class TableConfig:
    """One table as one server holds it.

    Attributes:
        name: the table's name (the module's path in the model, e.g. "user_emb").
        dim: row width.
        num_embeddings: N for a fixed table (ids in [0, N)); None for a dynamic one.
        num_servers, server_index: the job's servers and which one this is.
        seed: the job's seed (initial values of dynamic rows, and of a server-initialised
            fixed table's rows).
        init: how a dynamic row starts (and a server-initialised fixed table's rows).
        server_init: a fixed table whose rows this server fills from init_rows (proto.tables
            init_fixed_rows) rather than receiving them (InitRows).
        padding_idx: server_init: the id whose row starts as zeros (torch's padding row).
        admit_after: sightings (lookups counted) before a dynamic id gets a row; 1 = first.
        evict_after_steps: evict dynamic rows untouched for this many steps; 0 = never.
        max_rows, max_bytes: cap on this server's rows of the table (0 = none); the byte cap
            counts `row_bytes` per row.
        sketch_width, sketch_depth, sketch_halve_every: admission counters (admit_after > 1).
    """

    name: str
    dim: int
    num_embeddings: int | None = None
    num_servers: int = 1
    server_index: int = 0
    seed: int = 0
    init: RowInit = field(default_factory=RowInit)
    admit_after: int = 1
    evict_after_steps: int = 0
    max_rows: int = 0
    max_bytes: int = 0
    sketch_width: int = DEFAULT_WIDTH
    sketch_depth: int = DEFAULT_DEPTH
    sketch_halve_every: int = 0
    server_init: bool = False
    padding_idx: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a table needs a name")
        if self.dim < 1:
            raise ValueError(f"table {self.name!r}: dim must be >= 1, got {self.dim}")
        if not 0 <= self.server_index < self.num_servers:
            raise ValueError(f"table {self.name!r}: server {self.server_index} of {self.num_servers}")
        if self.num_embeddings is not None:
            FixedLayout(self.name, self.num_embeddings, self.num_servers)  # validates N
            if (self.admit_after, self.evict_after_steps, self.max_rows, self.max_bytes) != (1, 0, 0, 0):
                raise ValueError(f"table {self.name!r}: admission, eviction and caps are for "
                                 "dynamic tables (num_embeddings None)")
            if self.padding_idx is not None and not 0 <= self.padding_idx < self.num_embeddings:
                raise ValueError(f"table {self.name!r}: padding_idx {self.padding_idx} is out "
                                 f"of range [0, {self.num_embeddings})")
        elif self.server_init:
            raise ValueError(f"table {self.name!r}: server_init is for fixed tables (a dynamic "
                             "table's rows always start on the servers)")
        for key in ("admit_after", "evict_after_steps", "max_rows", "max_bytes"):
            if getattr(self, key) < (1 if key == "admit_after" else 0):
                raise ValueError(f"table {self.name!r}: bad {key} {getattr(self, key)}")

    @property
    def fixed(self) -> bool:
        return self.num_embeddings is not None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["init"] = asdict(self.init)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TableConfig:
        return cls(**{**d, "init": RowInit(**d["init"])})


@dataclass(frozen=True)
class TableStats:
    """A table shard's counters and sizes (the metrics' source)."""

    rows: int               # rows held
    capacity: int           # rows allocated
    bytes: int              # resident bytes: weights, state, metadata, index, sketch
    steps: int              # applies so far
    admissions: int = 0     # dynamic rows created
    evicted_idle: int = 0   # dynamic rows evicted for not being touched
    evicted_cap: int = 0    # dynamic rows evicted for the cap
    unadmitted_reads: int = 0   # ids looked up that read as zeros (not admitted, or no room)
    dropped_rows: int = 0   # gradient rows dropped (row not held)


@dataclass(frozen=True)
class TableState:
    """Everything a table shard needs to continue exactly where it was (TableShard.capture /
    from_state): its config, the optimizer's hyper-parameters and step count, the counters,
    and CPU tensors owned by this object.

    tensors: "weights" [rows, dim] and "state.<name>" per optimizer state (a fixed table: in
    slot order; a dynamic one: sorted by id, with "ids" and "last" (int64 [rows]: the id and
    the step it was last touched), and "sketch" (int32 [depth, width]) when it admits after
    k > 1 sightings). `sketch` then holds the sketch's small dict (width, depth, halving).
    """

    config: TableConfig
    optimizer: dict
    counters: dict[str, int]
    tensors: dict[str, torch.Tensor]
    sketch: dict | None = None
