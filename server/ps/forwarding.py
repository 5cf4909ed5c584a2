"""One push's way from a shard's primary to its backups (docs/architecture.md, "Replicated
shards"): sent cut-through where it can be, else whole, and the backups' replies read after
the primary's own apply.

Cut-through: a push that arrives uncompressed on the data plane while its shard's turn was
free is forwarded piece by piece as it arrives (an overlapped push's pieces as they complete,
an in-order push every PIECE_BYTES), as an overlapped push to each backup's data plane.
A backup then receives while the primary does and both apply at about the same time, where a
whole forward would first make the backup wait for the primary's last byte and then for its
own. Everything else (a compressed push, decoded on the primary and forwarded as fp32; a
backup without a data plane; a joining copy; a push whose turn came only after it was read)
is forwarded whole once it is in.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import torch

from shardps.proto import codec, common_pb2, ps_pb2
from shardps.psclient.plane import DataPlaneTransport, PlanePieces
from shardps.psclient.rpcpath import RpcTransport

# What reads a backup's reply, or why nothing was sent to it.
Pending = Callable[[], ps_pb2.PushResponse] | Exception
# Told of the elements [lo, hi) of the staging buffer once they have arrived (bulk.Fill).
OnPiece = Callable[[int, int], None]
# The bytes an in-order push is received and forwarded in, cut-through: a backup's last piece
# lands this much after the primary's.
PIECE_BYTES = 1024 * 1024


class Backup:
    """One backup server as the primary reaches it: its data plane where it has one, else
    its Push RPC (as psclient's per-server transport). Thread-safe, as both transports are."""

    def __init__(self, address: str):
        self.rpc = RpcTransport(address, codec.DEFAULT_CHUNK_BYTES)
        self.plane = DataPlaneTransport(address, self.rpc.data_port)

    def start(self, header: ps_pb2.PushHeader,
              grad: torch.Tensor) -> Callable[[], ps_pb2.PushResponse]:
        """Sends the push whole; returns what reads its reply. Over the data plane every byte
        of `grad` is on its way when this returns, so the caller may hand `grad` on; over the
        RPCs (whose threads read `grad` while they send it) the reply is read here."""
        if self.plane.available():
            pending = self.plane.start_push(header, grad)
            return lambda: pending.finish()[0]
        reply, _ = self.rpc.start_push(header, grad).finish()
        return lambda: reply

    def close(self) -> None:
        self.plane.close()
        self.rpc.close()


def piece_count(header: ps_pb2.PushHeader, grad: torch.Tensor) -> int:
    """How many pieces a push is forwarded in cut-through (as the data plane's fill reports
    them); 0 when it cannot be (compressed, or empty)."""
    if header.compression != ps_pb2.PUSH_COMPRESSION_NONE or grad.numel() == 0:
        return 0
    if header.pieces:
        return header.pieces
    per_piece = PIECE_BYTES // grad.element_size()
    return -(-grad.numel() // per_piece)


class Forward:
    """One push forwarded to `targets` (node id, Backup, whether it may be sent cut-through).
    `on_piece` (None unless cut-through) is given to the fill; `send` after the fill sends
    the push whole where it was not streamed; `replies` after the apply reads the replies;
    `cancel` instead, if the push was refused while it arrived. Used by the push's thread."""

    def __init__(self, header: ps_pb2.PushHeader, epoch: int, grad: torch.Tensor,
                 targets: list[tuple[str, Backup, bool]], cut_through: bool):
        self._header = ps_pb2.PushHeader()
        self._header.CopyFrom(header)
        self._header.replica_epoch = epoch
        self._header.pieces = 0
        if header.compression != ps_pb2.PUSH_COMPRESSION_NONE:  # decoded here: send fp32
            self._header.compression = ps_pb2.PUSH_COMPRESSION_NONE
            self._header.compressed_bytes = 0
            self._header.dtype = common_pb2.DTYPE_FLOAT32
        self._grad = grad
        self._targets = targets
        self._count = piece_count(header, grad) if cut_through else 0
        self._streams: dict[str, PlanePieces | Exception] | None = None  # opened at a piece
        self._sent = 0
        self._pending: list[tuple[str, Pending]] = []

    @property
    def on_piece(self) -> OnPiece | None:
        return self._piece if self._count else None

    def _piece(self, lo: int, hi: int) -> None:
        if self._streams is None:
            self._streams = self._open()
        part = self._grad[lo:hi]
        for target, stream in self._streams.items():
            if isinstance(stream, PlanePieces):
                try:
                    stream.send(lo, part)
                except Exception as exc:  # its connection is closed; reported by `replies`
                    self._streams[target] = exc
        self._sent += 1

    def _open(self) -> dict[str, PlanePieces | Exception]:
        header = ps_pb2.PushHeader()
        header.CopyFrom(self._header)
        header.pieces = self._count
        streams: dict[str, PlanePieces | Exception] = {}
        for target, backup, streamable in self._targets:
            if not streamable:
                continue
            try:
                if backup.plane.available():
                    streams[target] = backup.plane.start_pieces(header)
            except Exception as exc:
                streams[target] = exc
        return streams

    def send(self) -> str:
        """The push is in: finishes each stream, sends it whole to every other target.
        Returns the way it went: "cut_through" if a backup got it so, else "whole"."""
        streams = self._streams or {}
        way = "whole"
        for target, backup, _ in self._targets:
            stream = streams.get(target)
            if isinstance(stream, Exception):
                self._pending.append((target, stream))
            elif stream is not None and self._sent != self._count:
                stream.cancel()
                self._pending.append((target, RuntimeError(
                    f"{self._sent} of {self._count} pieces forwarded")))
            elif stream is not None:
                self._pending.append((target, _reply(stream)))
                way = "cut_through"
            else:
                try:
                    self._pending.append((target, backup.start(self._header, self._grad)))
                except Exception as exc:  # read in `replies`, after the apply
                    self._pending.append((target, exc))
        return way

    def cancel(self) -> None:
        """The push was refused before `send`: what was streamed is abandoned (each backup
        sees its connection close before the last piece, and applies nothing)."""
        for stream in (self._streams or {}).values():
            if isinstance(stream, PlanePieces):
                stream.cancel()

    def replies(self) -> str | None:
        """Reads every target's reply; why one did not take the push, or None."""
        failure = None
        for target, pending in self._pending:
            try:
                if isinstance(pending, Exception):
                    raise pending
                pending()
            except Exception as exc:  # any failure: the worker retries
                code = exc.code().name if isinstance(exc, grpc.RpcError) else type(exc).__name__
                details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                failure = failure or (
                    f"backup {target} of job {self._header.job_id} shard "
                    f"{self._header.shard_index} did not take the push ({code}: {details}); retry"
                )
        return failure


def _reply(stream: PlanePieces) -> Callable[[], ps_pb2.PushResponse]:
    return lambda: stream.finish()[0]
