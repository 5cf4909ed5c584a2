"""Row calls on one shard's tables (ps.proto's InitRows, PullRows, PushRows, ExportRows):
what each may change and when, under the shard's condition.

Pure core: no gRPC. Functions take the shard's `ShardCore`. Every refusal raises before
anything changes: TableIdError and TableRowsError (proto/tables.py) for bad ids and rows,
UnknownTableError, and the dense push's FencedError, UnknownWorkerError and StepAheadError.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardps.proto import ps_pb2
from shardps.proto import tables as tables_lib

from . import pulls
from .core import ShardCore
from .errors import InvalidPushError, StepAheadError
from .table_config import TableStats
from .table_shard import TableShard
from .tables import RowsAfterStartError


def init_rows(core: ShardCore, name: str, rows: torch.Tensor, first: int = 0) -> None:
    """Sets a fixed table's rows on this shard at slots [first, first + len(rows)), in slot
    order (rank 0 seeds them before the job runs, a few MiB per call, in slot order); once the
    last slot of every fixed table is set, `core.on_rows_set` (a new base checkpoint: one per
    seeding, not one per table or call). Refused once the shard has taken a step."""
    with core.cond:
        core.check_open()
        table = core.tables.get(name)
        if table.layout is None:
            raise tables_lib.TableRowsError(f"table {name!r} is dynamic: its rows start on the "
                                            "servers (init_rows), they are not seeded")
        if not 0 <= first <= first + rows.shape[0] <= table.rows:
            raise tables_lib.TableRowsError(
                f"table {name!r}: shard {core.config.shard_index} holds {table.rows} rows, "
                f"got rows [{first}, {first + rows.shape[0]})")
        tables_lib.check_rows(name, torch.empty(rows.shape[0]), rows, table.dim)  # bad input first
        if core.version or core.frozen:
            raise RowsAfterStartError(f"table {name!r}: rows are set before the first step; "
                                      f"shard {core.config.shard_index} is at version "
                                      f"{core.version}")
        table.write_rows(first, rows)
        if first + rows.shape[0] == table.rows:  # the last call of a seeding
            core.tables.seeded.add(name)
        if core.on_rows_set is not None and core.tables.all_seeded():
            core.on_rows_set()


def pull_rows(core: ShardCore, name: str, ids: torch.Tensor, min_version: int, clock: float,
              timeout: float, cancelled: Callable[[], bool] | None = None, *, count: bool = True,
              ) -> tuple[bool, int, torch.Tensor | None]:
    """(ready, version, rows of `ids`) once the version reaches `min_version` (and, ssp, the
    clock gate opens) within `timeout` s; rows None when not ready. `count` False: the read
    is not a sighting for admission (TableShard.lookup)."""
    table = core.tables.get(name)
    tables_lib.check_ids(name, ids, table.config.num_embeddings, unique_sorted=True)
    ready = pulls.wait_for_pull(core, min_version, clock, timeout, cancelled)
    with core.cond:
        core.check_open()
        if not ready:
            return False, core.version, None
        # Under the condition: a round closing now cannot interleave with this read.
        return True, core.version, table.lookup(ids, count=count)


def push_rows(core: ShardCore, name: str, *, worker: str, incarnation: int = 0, step: int,
              ids: torch.Tensor, rows: torch.Tensor) -> tuple[ps_pb2.PushStatus, int]:
    """One worker's row gradient of one table for one step: (status, version after).

    sync: buffered for the step's round (ACCEPTED; a retry replaces it), STALE once it
    closed; async and ssp: one optimizer step of the table on arrival (APPLIED), DUPLICATE
    for a step of this worker and table at or before one already applied (a retry). JOB_DONE
    once the job has ended; sync, until its final version is named, rows for the open round
    are still buffered (and answered JOB_DONE), as its dense pushes are held: naming the final
    version may close that round, and then with the same rows as on the other shards.
    """
    table = core.tables.get(name)
    tables_lib.check_ids(name, ids, table.config.num_embeddings, unique_sorted=True)
    tables_lib.check_rows(name, ids, rows, table.dim)
    if step < 0:
        raise InvalidPushError(f"step must be >= 0, got {step}", "bad_step")
    with core.cond:
        core.check_open()
        _check_owned(table, ids)
        if core.frozen:
            if core.final_version is None and core.gate.holds(worker, step, core.version,
                                                               core.workers):
                core.tables.buffer_locked(step, worker, name, ids, rows)
            return ps_pb2.PUSH_STATUS_JOB_DONE, core.version
        # A fenced incarnation is refused, a step its dense push already applied is a retry.
        early = core.fencing.check(worker, incarnation, step, core.workers)
        if early is not None:
            return early, core.version
        if not core.gate.sync:
            if step <= core.tables.applied.get((worker, name), -1):
                return ps_pb2.PUSH_STATUS_DUPLICATE, core.version
            table.apply(ids, rows)
            core.tables.applied[(worker, name)] = step
            return ps_pb2.PUSH_STATUS_APPLIED, core.version
        if step < core.version:
            return ps_pb2.PUSH_STATUS_STALE, core.version
        if step > core.version:
            raise StepAheadError(f"step ahead: rows of step {step} are ahead of the open round "
                                 f"{core.version}")
        core.tables.buffer_locked(step, worker, name, ids, rows)
        return ps_pb2.PUSH_STATUS_ACCEPTED, core.version


def export_rows(core: ShardCore, name: str, after: int | None, limit: int, min_version: int,
                timeout: float, cancelled: Callable[[], bool] | None = None,
                ) -> tuple[bool, int, tuple[torch.Tensor, torch.Tensor, bool] | None]:
    """(ready, version, (ids, rows, more)) of a dynamic table's rows held here with ids
    greater than `after`, at most `limit` of them, once the version reaches `min_version`
    within `timeout` s; None when not ready. Creates, counts and touches nothing."""
    table = core.tables.get(name)
    if table.layout is not None:
        raise tables_lib.TableRowsError(f"table {name!r} is fixed: read it with PullRows")
    if limit < 1:
        raise tables_lib.TableRowsError(f"table {name!r}: max_rows must be >= 1, got {limit}")
    ready = pulls.wait_for_pull(core, min_version, float("-inf"), timeout, cancelled)
    with core.cond:
        core.check_open()
        if not ready:
            return False, core.version, None
        return True, core.version, table.export_page(after, limit)


def _check_owned(table: TableShard, ids: torch.Tensor) -> None:
    """TableIdError unless every id lives on this shard (a lookup of nothing checks it)."""
    if ids.numel():
        if table.layout is not None:
            server, _ = table.layout.place(ids)
        else:
            server = tables_lib.dynamic_server_of(table.name, ids, table.config.num_servers)
        wrong = (server != table.config.server_index).nonzero()
        if wrong.numel():
            raise tables_lib.TableIdError(table.name, int(ids[wrong[0, 0]]),
                                          f"is not on shard {table.config.server_index}")


class ShardRows:
    """One shard's row calls (a Shard's `rows`): the functions above bound to its core.
    Thread-safe as they are."""

    def __init__(self, core: ShardCore):
        self._core = core

    def init(self, table: str, weights: torch.Tensor, first: int = 0) -> None:
        """Sets a fixed table's rows held here from slot `first`, in slot order (init_rows)."""
        init_rows(self._core, table, weights, first)

    def pull(self, table: str, ids: torch.Tensor, min_version: int, clock: float,
             timeout: float, cancelled: Callable[[], bool] | None = None, *, count: bool = True,
             ) -> tuple[bool, int, torch.Tensor | None]:
        """(ready, version, rows of `ids`) once `min_version` is reached (pull_rows)."""
        return pull_rows(self._core, table, ids, min_version, clock, timeout, cancelled,
                         count=count)

    def push(self, table: str, *, worker: str, incarnation: int = 0, step: int,
             ids: torch.Tensor, grads: torch.Tensor) -> tuple[ps_pb2.PushStatus, int]:
        """One worker's row gradient of a table for a step (push_rows)."""
        return push_rows(self._core, table, worker=worker, incarnation=incarnation,
                         step=step, ids=ids, rows=grads)

    def export(self, table: str, after: int | None, limit: int, min_version: int,
               timeout: float, cancelled: Callable[[], bool] | None = None,
               ) -> tuple[bool, int, tuple[torch.Tensor, torch.Tensor, bool] | None]:
        """A page of a dynamic table's rows held here, ascending by id (export_rows)."""
        return export_rows(self._core, table, after, limit, min_version, timeout, cancelled)

    def on_set(self, hook: Callable[[], None] | None) -> None:
        """Calls `hook` under the shard's lock after InitRows set a table's rows (before the
        first step: checkpoints take a new base there); it must not block."""
        with self._core.cond:
            self._core.on_rows_set = hook

    def dim(self, table: str) -> int:
        """A table's row width (UnknownTableError if the job has no such table)."""
        return self._core.tables.get(table).dim

    def stats(self, table: str) -> TableStats:
        """A table's counters here (steps, rows held, ...)."""
        return self._core.tables.get(table).stats()

    def held(self, table: str) -> torch.Tensor:
        """A copy of a fixed table's rows held here, in slot order (export, tests)."""
        return self._core.tables.get(table).rows_in_slot_order()
