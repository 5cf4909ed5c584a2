"""The table RPCs (InitRows, PullRows, PushRows, ExportRows) on a ShardRegistry: decode the request's
payloads, call the shard, encode the reply; every refusal is a `Refused` with the status of
bulk.CODES (INVALID_ARGUMENT naming the table and the id for bad ids and rows)."""

from __future__ import annotations

from collections.abc import Callable

from shardps.proto import common_pb2, names, ps_pb2, rowcodec
from shardps.proto.tables import TableIdError, TableRowsError

from .bulk import MAX_PULL_WAIT_S, Refused, refusal
from .errors import ShardError
from .registry import ShardRegistry
from .shard import Shard

# The most an ExportRows reply carries (ids and rows), far below gRPC's message limit.
EXPORT_PAGE_BYTES = 4 << 20

# What a row call may be refused for (everything else is a server bug and propagates).
_REFUSED = (ShardError, TableIdError, TableRowsError, names.InvalidName)


class RowService:
    """Thread-safe: the registry and the shards lock."""

    def __init__(self, shards: ShardRegistry):
        self.shards = shards
        self.stopping = False

    def _shard(self, job_id: str, index: int, table: str) -> Shard:
        """The shard, once the request's identifiers pass names.check (a table name is a
        module path: the same rule), so no reply echoes a caller's bytes unbounded."""
        names.check(job_id, "job_id")
        names.check(table, "table")
        return self.shards.get(job_id, index)

    def init_rows(self, request: ps_pb2.InitRowsRequest) -> ps_pb2.InitRowsResponse:
        try:
            shard = self._shard(request.job_id, request.shard_index, request.table)
            dim = shard.rows.dim(request.table)
            shard.rows.init(request.table, rowcodec.decode_rows(request.table, request.rows, dim),
                            request.first_row)
        except _REFUSED as exc:
            raise refusal(exc) from None
        return ps_pb2.InitRowsResponse()

    def pull_rows(self, request: ps_pb2.PullRowsRequest,
                  is_active: Callable[[], bool]) -> ps_pb2.PullRowsResponse:
        try:
            shard = self._shard(request.job_id, request.shard_index, request.table)
            ids = rowcodec.decode_ids(request.table, request.ids)
            clock = request.clock if shard.mode == common_pb2.CONSISTENCY_SSP else 0
            timeout = min(max(request.timeout_ms, 0) / 1000, MAX_PULL_WAIT_S)
            ready, version, rows = shard.rows.pull(
                request.table, ids, request.min_version, clock, timeout,
                lambda: self.stopping or not is_active(), count=not request.no_count)
        except _REFUSED as exc:
            raise refusal(exc) from None
        if rows is None:
            return ps_pb2.PullRowsResponse(ready=False, version=version, job_done=shard.frozen)
        return ps_pb2.PullRowsResponse(ready=True, version=version, job_done=shard.frozen,
                                       rows=rowcodec.encode_rows(rows))

    def export_rows(self, request: ps_pb2.ExportRowsRequest,
                    is_active: Callable[[], bool]) -> ps_pb2.ExportRowsResponse:
        try:
            shard = self._shard(request.job_id, request.shard_index, request.table)
            dim = shard.rows.dim(request.table)
            limit = min(request.max_rows, max(1, EXPORT_PAGE_BYTES // (8 + 4 * dim)))
            timeout = min(max(request.timeout_ms, 0) / 1000, MAX_PULL_WAIT_S)
            ready, version, page = shard.rows.export(
                request.table, request.after_id if request.after_set else None, limit,
                request.min_version, timeout, lambda: self.stopping or not is_active())
        except _REFUSED as exc:
            raise refusal(exc) from None
        if page is None:
            return ps_pb2.ExportRowsResponse(ready=False, version=version)
        ids, rows, more = page
        return ps_pb2.ExportRowsResponse(ready=True, version=version, ids=rowcodec.encode_ids(ids),
                                         rows=rowcodec.encode_rows(rows), more=more)

    def push_rows(self, request: ps_pb2.PushRowsRequest) -> ps_pb2.PushRowsResponse:
        try:
            names.check(request.worker_id, "worker_id")
            shard = self._shard(request.job_id, request.shard_index, request.table)
            if request.dtype != common_pb2.DTYPE_FLOAT32:
                raise TableRowsError(f"table {request.table!r}: rows must be DTYPE_FLOAT32, got "
                                     f"{common_pb2.DType.Name(request.dtype)}"
                                     if request.dtype in common_pb2.DType.values() else
                                     f"table {request.table!r}: unknown dtype {request.dtype}")
            dim = shard.rows.dim(request.table)
            ids = rowcodec.decode_ids(request.table, request.ids)
            rows = rowcodec.decode_rows(request.table, request.rows, dim)
            status, version = shard.rows.push(
                request.table, worker=request.worker_id, incarnation=request.incarnation,
                step=request.step, ids=ids, grads=rows)
        except _REFUSED as exc:
            raise refusal(exc) from None
        return ps_pb2.PushRowsResponse(status=status, version=version)


__all__ = ["RowService", "Refused"]
