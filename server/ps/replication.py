"""Replicated shards on one server (docs/architecture.md, "Replicated shards"): which replica
of each shard of a replicated job this server is, from the replica map InitShard brings and
the coordinator's views update, and the primary's half of the protocol: a worker's push is
forwarded whole to every backup, and applied here only once every backup has it.

Pushes of one shard take turns on the primary (one lock per shard, held from the forward to
the apply), so every backup receives them in the order the primary applies them: in async and
ssp a backup applies the same pushes in the same order, in sync it closes the same rounds
with the same contributions, so its weights and Adam state are the primary's, bit for bit.

Forwarding uses the worker's own transports (the backup's data plane, else its Push RPC); a
backup that does not take a push makes the primary refuse it UNAVAILABLE, applying nothing,
and the worker retries it (a retry that reaches a replica which already has it is answered
DUPLICATE). Thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from shardps.proto import codec, common_pb2, ps_pb2
from shardps.psclient.plane import DataPlaneTransport
from shardps.psclient.rpcpath import RpcTransport

log = logging.getLogger("shardps.ps")

PRIMARY, BACKUP, JOINING, DROPPED = "primary", "backup", "joining", "none"
# The refusal a worker that pushed to a replica which is not the primary gets (UNAVAILABLE,
# retried after re-reading the shard map).
NOT_PRIMARY = "not the primary of"
# A primary not answered by the coordinator for LEASE_FRACTION of a lease stops acknowledging.
OUT_OF_TOUCH = "the coordinator has not answered this server"
LEASE_FRACTION = 0.75
# Owed pushes remembered per shard (a backup that stays unreachable is dropped from the map
# within a lease, and then nothing is owed to it).
MAX_OWED = 4096


def _push_id(header: ps_pb2.PushHeader) -> tuple[str, int, int]:
    return header.worker_id, header.incarnation, header.step


class ReplicaRefused(Exception):
    """A push this replica must refuse; `code` is the gRPC status (nothing changed)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Placement:
    """One shard's replicas as the newest map this server has seen names them."""

    epoch: int                               # ShardRange.replica_epoch (> 0)
    primary: str                             # node id
    backups: tuple[tuple[str, str], ...]     # (node id, address), in promotion order
    # Joining copies (transfer.py): (node id, address, join epoch).
    joiners: tuple[tuple[str, str, int], ...] = ()

    def role(self, me: str) -> str:
        if me == self.primary:
            return PRIMARY
        if any(b == me for b, _ in self.backups):
            return BACKUP
        return JOINING if any(j == me for j, _, _ in self.joiners) else DROPPED

    def join_epoch(self, me: str) -> int:
        """The join epoch of this server's joining copy; 0 if it is not joining."""
        return next((e for j, _, e in self.joiners if j == me), 0)


class _Backup:
    """One backup server as the primary reaches it: its data plane where it has one, else
    its Push RPC (as psclient's per-server transport). Thread-safe, as both transports are."""

    def __init__(self, address: str):
        self.rpc = RpcTransport(address, codec.DEFAULT_CHUNK_BYTES)
        self.plane = DataPlaneTransport(address, self.rpc.data_port)

    def start(self, header: ps_pb2.PushHeader,
              grad: torch.Tensor) -> Callable[[], ps_pb2.PushResponse]:
        """Sends the push; returns what reads its reply. Over the data plane every byte of
        `grad` is on its way when this returns, so the caller may hand `grad` on; over the
        RPCs (whose threads read `grad` while they send it) the reply is read here."""
        if self.plane.available():
            pending = self.plane.start_push(header, grad)
            return lambda: pending.finish()[0]
        reply, _ = self.rpc.start_push(header, grad).finish()
        return lambda: reply

    def close(self) -> None:
        self.plane.close()
        self.rpc.close()


class Replicas:
    """The placements of this server's replicated shards and their backups' links.

    `self_id()` is this server's node id ("" until it has registered: then it is no one's
    primary and refuses workers' pushes to replicated shards). `in_touch()` says whether the
    coordinator answered this server within the last LEASE_FRACTION of a lease: a primary
    that is not refuses workers' pushes (UNAVAILABLE), so that once the coordinator may have
    promoted a backup (a lease after it last heard of us) we no longer acknowledge any.
    """

    def __init__(self, self_id: Callable[[], str], in_touch: Callable[[], bool] = lambda: True):
        self._self_id = self_id
        self._in_touch = in_touch
        self._lock = threading.Lock()
        self._placements: dict[tuple[str, int], Placement] = {}
        self._turns: dict[tuple[str, int], threading.Lock] = {}
        self._backups: dict[str, _Backup] = {}
        # Per shard: pushes (worker, incarnation, step) applied here that a backup has not
        # confirmed; a retry of one is forwarded again before it is answered DUPLICATE.
        self._owed: dict[tuple[str, int], set[tuple[str, int, int]]] = {}
        # Per shard: joining copies this primary forwards to, (node id, join epoch) ->
        # address, armed by a transfer under the shard's turn (transfer.py).
        self._armed: dict[tuple[str, int], dict[tuple[str, int], str]] = {}
        # Called (job id, shard index, placement) after each newer placement is taken.
        self.on_placement: list[Callable[[str, int, Placement], None]] = []

    # -- the map -----------------------------------------------------------------------

    def adopt(self, job_id: str, shard_map: common_pb2.ShardMap) -> None:
        """Takes each replicated shard's placement from `shard_map` where its epoch is newer
        than the one known here (an older map, e.g. a late view, changes nothing)."""
        for shard in shard_map.shards:
            if shard.replica_epoch <= 0:
                continue
            placement = Placement(shard.replica_epoch, shard.server_id, tuple(
                zip(shard.backup_ids, shard.backup_addresses, strict=True)), tuple(
                zip(shard.joining_ids, shard.joining_addresses, shard.joining_epochs,
                    strict=True)))
            key = (job_id, shard.index)
            with self._lock:
                known = self._placements.get(key)
                if known is not None and known.epoch >= placement.epoch:
                    continue
                self._placements[key] = placement
                joining = {(j, e) for j, _, e in placement.joiners}
                armed = self._armed.get(key, {})
                for gone in [j for j in armed if j not in joining]:
                    del armed[gone]  # a backup now, or dropped
            for hook in self.on_placement:
                hook(job_id, shard.index, placement)
            if known is not None:
                me = self._self_id()
                log.info("job %s shard %d: replica epoch %d: %s here (primary %s, backups %s)",
                         job_id, shard.index, placement.epoch, placement.role(me),
                         placement.primary, ",".join(b for b, _ in placement.backups) or "none")

    def forget(self, job_id: str) -> None:
        """The job's shards were dropped here."""
        with self._lock:
            for key in [k for k in self._placements if k[0] == job_id]:
                del self._placements[key]
                self._turns.pop(key, None)
                self._owed.pop(key, None)
                self._armed.pop(key, None)

    def describe(self, job_id: str, index: int) -> tuple[int, str]:
        """(replica epoch, role) of a shard here; (0, "") for a shard without replicas."""
        with self._lock:
            placement = self._placements.get((job_id, index))
        return (0, "") if placement is None else (placement.epoch, placement.role(self._self_id()))

    # -- pushes ------------------------------------------------------------------------

    def check(self, header: ps_pb2.PushHeader) -> None:
        """Refuses (ReplicaRefused) a push this replica may not take, before it is read: a
        worker's push to a replica that is not the shard's primary (UNAVAILABLE: the worker
        re-reads the map), a forwarded push of an older replica epoch or to a primary of the
        same epoch (FAILED_PRECONDITION)."""
        with self._lock:
            placement = self._placements.get((header.job_id, header.shard_index))
        if placement is None:
            return
        role = placement.role(self._self_id())
        where = f"job {header.job_id} shard {header.shard_index}"
        if header.replica_epoch == 0:
            if role != PRIMARY:
                raise ReplicaRefused(grpc.StatusCode.UNAVAILABLE, (
                    f"{NOT_PRIMARY} {where} (replica epoch {placement.epoch}, primary "
                    f"{placement.primary}); re-read the shard map"))
            if not self._in_touch():
                raise ReplicaRefused(grpc.StatusCode.UNAVAILABLE, (
                    f"{OUT_OF_TOUCH} for most of a lease: not acknowledging pushes to {where} "
                    f"as its primary (replica epoch {placement.epoch})"))
            return
        if header.replica_epoch < placement.epoch or (
                role == PRIMARY and header.replica_epoch == placement.epoch):
            raise ReplicaRefused(grpc.StatusCode.FAILED_PRECONDITION, (
                f"stale replica epoch: a push forwarded at epoch {header.replica_epoch} to "
                f"{where}, which is at epoch {placement.epoch} here ({role})"))

    @contextlib.contextmanager
    def turn(self, header: ps_pb2.PushHeader, grad: torch.Tensor) -> Iterator[None]:
        """Around the apply of a checked push whose elements are in `grad` (the wire dtype,
        fp32 for a compressed push). On the shard's primary: takes the shard's turn, sends
        the push to every backup, runs the body (the apply here, while the backups apply
        theirs), then reads every backup's reply. If one did not take the push, raises
        ReplicaRefused UNAVAILABLE after the body: the push was applied here but is not
        acknowledged, and it is *owed* to the backups (`owed`): the worker's retry, which
        this copy then answers DUPLICATE, is forwarded again before that answer. Elsewhere
        (no replicas, a forwarded push) it just runs the body."""
        key = (header.job_id, header.shard_index)
        if header.replica_epoch != 0:
            yield
            return
        with self._lock:
            placement = self._placements.get(key)
            turn = self._turns.setdefault(key, threading.Lock()) if placement else None
        if placement is None or turn is None:
            yield
            return
        with turn:
            with self._lock:  # the map may have changed while we waited for the turn
                placement = self._placements[key] if key in self._placements else placement
            self.check(header)
            replies = self._start(header, grad, placement)
            self.check(header)  # still the primary, and in touch, now that backups have it
            try:
                yield
            finally:
                self._finish(header, replies)

    @contextlib.contextmanager
    def shard_turn(self, job_id: str, index: int, timeout: float) -> Iterator[bool]:
        """Holds the shard's turn (no push of it is between its forward and its apply) for
        the body; yields False (not held) if it was not free within `timeout` s."""
        with self._lock:
            turn = self._turns.setdefault((job_id, index), threading.Lock())
        if not turn.acquire(timeout=timeout):
            yield False
            return
        try:
            yield True
        finally:
            turn.release()

    def arm(self, job_id: str, index: int, joiner: tuple[str, str, int]) -> None:
        """From now on forwards the shard's pushes to this joining copy too (id, address,
        join epoch); call under the shard's turn, with the state just captured."""
        with self._lock:
            self._armed.setdefault((job_id, index), {})[(joiner[0], joiner[2])] = joiner[1]

    def disarm(self, job_id: str, index: int, joiner_id: str, join_epoch: int) -> None:
        with self._lock:
            self._armed.get((job_id, index), {}).pop((joiner_id, join_epoch), None)

    def owed(self, header: ps_pb2.PushHeader) -> bool:
        """Whether this push was applied here but not confirmed by every backup."""
        with self._lock:
            return _push_id(header) in self._owed.get((header.job_id, header.shard_index), ())

    def _start(self, header: ps_pb2.PushHeader, grad: torch.Tensor,
               placement: Placement) -> list[tuple[str, Callable[[], ps_pb2.PushResponse] | Exception]]:
        forwarded = ps_pb2.PushHeader()
        forwarded.CopyFrom(header)
        forwarded.replica_epoch = placement.epoch
        forwarded.pieces = 0  # an overlapped push's pieces are whole in `grad` by now
        if forwarded.compression != ps_pb2.PUSH_COMPRESSION_NONE:  # decoded here: send fp32
            forwarded.compression = ps_pb2.PUSH_COMPRESSION_NONE
            forwarded.compressed_bytes = 0
            forwarded.dtype = common_pb2.DTYPE_FLOAT32
        started: list[tuple[str, Callable[[], ps_pb2.PushResponse] | Exception]] = []
        with self._lock:  # armed joining copies count as backups (docs: "Catch-up")
            armed = [(j, a) for (j, _), a in
                     self._armed.get((header.job_id, header.shard_index), {}).items()]
        for backup_id, address in [*placement.backups, *armed]:
            try:
                started.append((backup_id, self._backup(address).start(forwarded, grad)))
            except Exception as exc:  # read in _finish, after the body
                started.append((backup_id, exc))
        return started

    def _finish(self, header: ps_pb2.PushHeader,
                started: list[tuple[str, Callable[[], ps_pb2.PushResponse] | Exception]]) -> None:
        failure = None
        for backup_id, pending in started:
            try:
                if isinstance(pending, Exception):
                    raise pending
                pending()
            except Exception as exc:  # any failure: the worker retries
                code = exc.code().name if isinstance(exc, grpc.RpcError) else type(exc).__name__
                details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                failure = failure or (
                    f"backup {backup_id} of job {header.job_id} shard {header.shard_index} "
                    f"did not take the push ({code}: {details}); retry")
        key, push = (header.job_id, header.shard_index), _push_id(header)
        with self._lock:
            owed = self._owed.setdefault(key, set())
            if failure is None:
                owed.discard(push)
            elif len(owed) < MAX_OWED:
                owed.add(push)
        if failure is not None:
            raise ReplicaRefused(grpc.StatusCode.UNAVAILABLE, failure)

    def _backup(self, address: str) -> _Backup:
        with self._lock:
            backup = self._backups.get(address)
            if backup is None:
                backup = self._backups[address] = _Backup(address)
            return backup

    def close(self) -> None:
        with self._lock:
            backups, self._backups = list(self._backups.values()), {}
        for backup in backups:
            backup.close()
