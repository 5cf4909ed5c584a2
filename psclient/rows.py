"""RowClient: the table RPCs (InitRows, PullRows, PushRows) of one job, per shard of its map.

Over gRPC only (the data plane does not carry rows yet). Payloads are encoded by
proto/rowcodec.py; errors are grpc.RpcErrors. Thread-safety: one RowClient per thread of use,
like PSClient.
"""

from __future__ import annotations

import grpc
import torch

from shardps.proto import common_pb2, ps_pb2, ps_pb2_grpc, rowcodec
from shardps.proto.tables import FixedLayout, merge_dynamic
from shardps.runtime import rpc


class RowClient:
    """Row calls of one job to the shards of its shard map (`remap` follows a new map)."""

    def __init__(self, job_id: str, shard_map: common_pb2.ShardMap, *, worker_id: str = "",
                 incarnation: int = 0):
        self.job_id, self.worker_id, self.incarnation = job_id, worker_id, incarnation
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[int, ps_pb2_grpc.ParameterServerStub] = {}
        self.shard_map = common_pb2.ShardMap()
        self.remap(shard_map)

    @property
    def num_shards(self) -> int:
        return len(self.shard_map.shards)

    def remap(self, shard_map: common_pb2.ShardMap) -> None:
        """Reaches each shard at its address in `shard_map` (channels reused per address)."""
        if shard_map == self.shard_map:
            return
        channels: dict[str, grpc.Channel] = {}
        for shard in shard_map.shards:
            if shard.address not in channels:
                old = self._channels.pop(shard.address, None)
                channels[shard.address] = old if old is not None else rpc.make_channel(shard.address)
        self.close()
        self._channels = dict(channels)
        self._stubs = {s.index: ps_pb2_grpc.ParameterServerStub(channels[s.address])
                       for s in shard_map.shards}
        self.shard_map = shard_map

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels = {}

    def init_rows(self, table: str, shard: int, rows: torch.Tensor) -> None:
        """Sets a fixed table's rows held by `shard` (slot order)."""
        self._stubs[shard].InitRows(ps_pb2.InitRowsRequest(
            job_id=self.job_id, shard_index=shard, table=table, rows=rowcodec.encode_rows(rows)),
            timeout=rpc.TRANSFER_DEADLINE_S)

    def pull_rows(self, table: str, shard: int, ids: torch.Tensor, dim: int, *,
                  min_version: int = 0, timeout_s: float = 30.0, clock: int = 0,
                  count: bool = True) -> tuple[ps_pb2.PullRowsResponse, torch.Tensor | None]:
        """The reply and, when ready, the rows [len(ids), dim] of `ids` held by `shard`;
        `count` False: the read is no sighting for a dynamic table's admission."""
        reply = self._stubs[shard].PullRows(ps_pb2.PullRowsRequest(
            job_id=self.job_id, shard_index=shard, table=table, ids=rowcodec.encode_ids(ids),
            min_version=min_version, timeout_ms=int(timeout_s * 1000), clock=clock,
            no_count=not count),
            timeout=timeout_s + rpc.TRANSFER_DEADLINE_S)
        if not reply.ready:
            return reply, None
        return reply, rowcodec.decode_rows(table, reply.rows, dim)

    def push_rows(self, table: str, shard: int, ids: torch.Tensor, rows: torch.Tensor, *,
                  step: int, batch_size: int) -> ps_pb2.PushRowsResponse:
        """One step's coalesced row gradient of `table` for the ids `shard` holds."""
        return self._stubs[shard].PushRows(ps_pb2.PushRowsRequest(
            job_id=self.job_id, shard_index=shard, table=table, worker_id=self.worker_id,
            incarnation=self.incarnation, step=step, batch_size=batch_size,
            ids=rowcodec.encode_ids(ids), rows=rowcodec.encode_rows(rows),
            dtype=common_pb2.DTYPE_FLOAT32), timeout=rpc.TRANSFER_DEADLINE_S)

    def export_rows(self, table: str, shard: int, dim: int, after: int | None, max_rows: int, *,
                    min_version: int = 0, timeout_s: float = 30.0,
                    ) -> tuple[ps_pb2.ExportRowsResponse, torch.Tensor | None, torch.Tensor | None]:
        """A page of a dynamic table's rows held by `shard`, ids ascending and greater than
        `after` (None: from the smallest): (reply, ids, rows), ids and rows None when not ready."""
        reply = self._stubs[shard].ExportRows(ps_pb2.ExportRowsRequest(
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
