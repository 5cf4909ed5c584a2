"""RowClient: the table calls (InitRows, PullRows, PushRows) of one job, per shard of its map.

Each server is reached over its data plane when it has one, else over the RPCs
(rowplane.py); the batch calls (`pull_many`, `push_many`) send every shard's request before
they read any reply. Payloads are encoded by proto/rowcodec.py; errors are grpc.RpcErrors.
Thread-safety: one RowClient per thread of use, like PSClient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from google.protobuf.message import Message

from shardps.proto import common_pb2, ps_pb2, rowcodec
from shardps.proto.tables import FixedLayout, merge_dynamic
from shardps.psclient.rowplane import PendingRows, RowServer
from shardps.runtime import rpc

_M = TypeVar("_M", bound=Message)
# InitRows sends a shard's rows in calls of about this many bytes (gRPC's limit is 32 MiB).
INIT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class RowPull:
    """The ids of one table that one shard holds (strictly increasing)."""

    table: str
    shard: int
    ids: torch.Tensor


@dataclass(frozen=True)
class RowPush:
    """One table's coalesced row gradient for the ids one shard holds."""

    table: str
    shard: int
    ids: torch.Tensor
    rows: torch.Tensor


class RowClient:
    """Row calls of one job to the shards of its shard map (`remap` follows a new map)."""

    def __init__(self, job_id: str, shard_map: common_pb2.ShardMap, *, worker_id: str = "",
                 incarnation: int = 0, data_plane: bool = True):
        """`data_plane`: use the servers' data planes where they have one (else gRPC only)."""
        self.job_id, self.worker_id, self.incarnation = job_id, worker_id, incarnation
        self._data_plane = data_plane
        self._by_address: dict[str, RowServer] = {}
        self._servers: dict[int, RowServer] = {}
        self.shard_map = common_pb2.ShardMap()
        self.remap(shard_map)

    @property
    def num_shards(self) -> int:
        return len(self.shard_map.shards)

    def remap(self, shard_map: common_pb2.ShardMap) -> None:
        """Reaches each shard at its address in `shard_map` (servers reused per address)."""
        if shard_map == self.shard_map:
            return
        by_address: dict[str, RowServer] = {}
        for shard in shard_map.shards:
            if shard.address not in by_address:
                old = self._by_address.pop(shard.address, None)
                by_address[shard.address] = old or RowServer(shard.address, self._data_plane)
        self.close()
        self._by_address = by_address
        self._servers = {s.index: by_address[s.address] for s in shard_map.shards}
        self.shard_map = shard_map

    def close(self) -> None:
        for server in self._by_address.values():
            server.close()
        self._by_address = {}

    def init_rows(self, table: str, shard: int, rows: torch.Tensor, first_row: int = 0) -> None:
        """Sets a fixed table's rows held by `shard` from slot `first_row` on (all of them by
        default, in slot order), about INIT_BYTES per call."""
        step = max(1, INIT_BYTES // max(1, 4 * rows[0].numel())) if rows.numel() else 1
        for lo in range(0, max(1, rows.shape[0]), step):
            self._servers[shard].start("InitRows", ps_pb2.InitRowsRequest(
                job_id=self.job_id, shard_index=shard, table=table, first_row=first_row + lo,
                rows=rowcodec.encode_rows(rows[lo : lo + step])),
                ps_pb2.InitRowsResponse, rpc.TRANSFER_DEADLINE_S).result()

    def pull_rows(self, table: str, shard: int, ids: torch.Tensor, dim: int, *,
                  min_version: int = 0, timeout_s: float = 30.0, clock: int = 0,
                  count: bool = True) -> tuple[ps_pb2.PullRowsResponse, torch.Tensor | None]:
        """The reply and, when ready, the rows [len(ids), dim] of `ids` held by `shard`;
        `count` False: the read is no sighting for a dynamic table's admission."""
        return self.pull_many([RowPull(table, shard, ids)], dim, min_version=min_version,
                              timeout_s=timeout_s, clock=clock, count=count)[0]

    def pull_many(self, pulls: Sequence[RowPull], dim: int, *, min_version: int = 0,
                  timeout_s: float = 30.0, clock: int = 0, count: bool = True,
                  ) -> list[tuple[ps_pb2.PullRowsResponse, torch.Tensor | None]]:
        """pull_rows for each of `pulls` (tables of row width `dim`), every request sent
        before any reply is read; the results in the same order."""
        requests = [ps_pb2.PullRowsRequest(
            job_id=self.job_id, shard_index=p.shard, table=p.table, ids=rowcodec.encode_ids(p.ids),
            min_version=min_version, timeout_ms=int(timeout_s * 1000), clock=clock,
            no_count=not count) for p in pulls]
        replies = _call_all([functools.partial(
            self._servers[p.shard].start, "PullRows", request, ps_pb2.PullRowsResponse,
            timeout_s + rpc.TRANSFER_DEADLINE_S) for p, request in zip(pulls, requests, strict=True)])
        return [(reply, rowcodec.decode_rows(p.table, reply.rows, dim) if reply.ready else None)
                for p, reply in zip(pulls, replies, strict=True)]

    def push_rows(self, table: str, shard: int, ids: torch.Tensor, rows: torch.Tensor, *,
                  step: int, batch_size: int) -> ps_pb2.PushRowsResponse:
        """One step's coalesced row gradient of `table` for the ids `shard` holds."""
        return self.push_many([RowPush(table, shard, ids, rows)], step=step,
                              batch_size=batch_size)[0]

    def push_many(self, pushes: Sequence[RowPush], *, step: int,
                  batch_size: int) -> list[ps_pb2.PushRowsResponse]:
        """push_rows for each of `pushes` (at most one per table and shard: a second would
        replace the first in a sync round), every request sent before any reply is read."""
        return _call_all([functools.partial(
            self._servers[p.shard].start, "PushRows", ps_pb2.PushRowsRequest(
                job_id=self.job_id, shard_index=p.shard, table=p.table, worker_id=self.worker_id,
                incarnation=self.incarnation, step=step, batch_size=batch_size,
                ids=rowcodec.encode_ids(p.ids), rows=rowcodec.encode_rows(p.rows),
                dtype=common_pb2.DTYPE_FLOAT32), ps_pb2.PushRowsResponse, rpc.TRANSFER_DEADLINE_S)
            for p in pushes])

    def shard_infos(self, timeout_s: float = rpc.CONTROL_DEADLINE_S) -> dict[int, ps_pb2.ShardInfo]:
        """This job's ShardInfo of every shard of the map, by shard index (GetShardInfo on
        each server, every request sent before any reply is read); a shard its server does
        not list is absent. Raises grpc.RpcError."""
        futures = {address: server.stub.GetShardInfo.future(
            ps_pb2.GetShardInfoRequest(job_id=self.job_id), timeout=timeout_s)
            for address, server in self._by_address.items()}
        wanted = {(s.index, s.address) for s in self.shard_map.shards}
        return {info.shard_index: info for address, future in futures.items()
                for info in future.result().shards if (info.shard_index, address) in wanted}

    def export_rows(self, table: str, shard: int, dim: int, after: int | None, max_rows: int, *,
                    min_version: int = 0, timeout_s: float = 30.0,
                    ) -> tuple[ps_pb2.ExportRowsResponse, torch.Tensor | None, torch.Tensor | None]:
        """A page of a dynamic table's rows held by `shard`, ids ascending and greater than
        `after` (None: from the smallest): (reply, ids, rows), ids and rows None when not ready."""
        reply = self._servers[shard].stub.ExportRows(ps_pb2.ExportRowsRequest(
            job_id=self.job_id, shard_index=shard, table=table, min_version=min_version,
            timeout_ms=int(timeout_s * 1000), after_set=after is not None,
            after_id=after or 0, max_rows=max_rows), timeout=timeout_s + rpc.TRANSFER_DEADLINE_S)
        if not reply.ready:
            return reply, None, None
        ids, rows = rowcodec.decode_ids(table, reply.ids), rowcodec.decode_rows(table, reply.rows, dim)
        if rows.shape[0] != ids.numel():
            raise ValueError(f"table {table!r}: shard {shard} sent {rows.shape[0]} rows for "
                             f"{ids.numel()} ids")
        return reply, ids, rows

def _call_all(starts: Sequence[Callable[[], PendingRows[_M]]]) -> list[_M]:
    """Starts every call (sends its request), then reads every reply, in order. Every started
    call's reply is read before the first error is raised, so no call of the batch is in
    flight when the caller retries it."""
    started: list[PendingRows[_M]] = []
    error: Exception | None = None
    for start in starts:
        try:
            started.append(start())
        except Exception as exc:
            error = exc
            break
    replies: list[_M] = []
    for call in started:
        try:
            replies.append(call.result())
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error
    return replies


# Rows per PullRows when a whole table is read (export): about this many bytes per message.
READ_BYTES = 1 << 20


def read_table(client: RowClient, spec: ps_pb2.TableSpec, versions: list[int],
               timeout_s: float = rpc.CONTROL_DEADLINE_S) -> torch.Tensor | None:
    """A fixed table's rows [num_embeddings, dim] in id order, from every shard, each read at
    the version given for it (`versions`, by shard index: the dense pull's); None if some
    shard has moved past it (read again)."""
    layout = FixedLayout(spec.name, spec.num_embeddings, spec.num_shards)
    step = max(1, READ_BYTES // (4 * spec.dim))
    out = torch.empty((spec.num_embeddings, spec.dim), dtype=torch.float32)
    for shard in range(spec.num_shards):
        ids = torch.sort(layout.ids_on(shard)).values  # the wire takes ids sorted
        for lo in range(0, ids.numel(), step):
            piece = ids[lo : lo + step]
            reply, rows = client.pull_rows(spec.name, shard, piece, spec.dim,
                                           min_version=versions[shard], timeout_s=timeout_s)
            if rows is None or reply.version != versions[shard]:
                return None
            out[piece] = rows
    return out


# Pages per shard when a dynamic table is read (export): bounds the loop; 2**20 pages of about
# READ_BYTES each is a terabyte of rows.
MAX_EXPORT_PAGES = 1 << 20


def read_dynamic(client: RowClient, spec: ps_pb2.TableSpec, versions: list[int],
                 timeout_s: float = rpc.CONTROL_DEADLINE_S,
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A dynamic table's (ids ascending, rows) held by every shard, each shard read at the
    version given for it (`versions`, by shard index); None if some shard has moved past it."""
    per_page = max(1, READ_BYTES // (8 + 4 * spec.dim))
    parts = []
    for shard in range(spec.num_shards):
        after = None
        for _ in range(MAX_EXPORT_PAGES):
            reply, ids, rows = client.export_rows(spec.name, shard, spec.dim, after, per_page,
                                                  min_version=versions[shard], timeout_s=timeout_s)
            if ids is None or rows is None or reply.version != versions[shard]:
                return None
            parts.append((ids, rows))
            if not reply.more:
                break
            after = int(ids[-1])
        else:
            raise RuntimeError(f"table {spec.name!r}: shard {shard} sent more than "
                               f"{MAX_EXPORT_PAGES} pages")
    return merge_dynamic(parts) if parts else (torch.zeros(0, dtype=torch.int64),
                                               torch.zeros(0, spec.dim))
