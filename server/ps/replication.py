"""Replicated shards on one server (docs/architecture.md, "Replicated shards"): which replica
of each shard of a replicated job this server is, from the replica map InitShard brings and
the coordinator's views update, and the primary's half of the protocol: a worker's push is
forwarded to every backup (cut-through as it arrives where it can be, forwarding.py) and
acknowledged only once every backup has applied it too.

Pushes of one shard take turns on the primary (one lock per shard, held from the forward, or
from the push's first byte when it is forwarded cut-through, to its backups' replies), so
every backup receives them in the order the primary applies them: in async and ssp a backup
applies the same pushes in the same order, in sync it closes the same rounds with the same
contributions, so its weights and Adam state are the primary's, bit for bit.

Forwarding uses the worker's own transports (the backup's data plane, else its Push RPC); a
backup that does not take a push makes the primary refuse it UNAVAILABLE after applying it
here (the push is then owed to the backups), and the worker retries it (a retry that reaches
a replica which already has it is answered DUPLICATE). Thread-safe."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.runtime import rpc

from .forwarding import Backup, Forward, OnPiece

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
# The longest a push waits for its shard's turn: each holder is bounded by its transfers'
# deadlines (its receipt, its forward, its backups' replies).
TURN_WAIT_S = 2 * rpc.TRANSFER_DEADLINE_S


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
        # Per shard: workers' pushes in flight that began while it had no placement (no
        # replicas): they hold no turn, so a capture waits until they are applied (shard_turn).
        self._unplaced: dict[tuple[str, int], int] = {}
        self._drained = threading.Condition(self._lock)
        self._backups: dict[str, Backup] = {}
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
    def turn(self, header: ps_pb2.PushHeader, grad: torch.Tensor) -> Iterator[Turn]:
        """Around the receipt and apply of a checked push whose elements go into `grad` (the
        wire dtype, fp32 for a compressed push); the body fills `grad` (giving the fill
        `Turn.on_piece`), then calls `Turn.forward`, then applies.

        On the shard's primary the push takes the shard's turn: before its first byte if the
        turn is free (then it is forwarded cut-through as it arrives, forwarding.py), else at
        `forward`. `forward` sends the rest to every backup; the body applies here while the
        backups apply theirs; then every reply is read. If a backup did not take the push,
        raises ReplicaRefused UNAVAILABLE after the body: the push was applied here but is not
        acknowledged, and it is *owed* to the backups (`owed`): the worker's retry, which
        this copy then answers DUPLICATE, is forwarded again before that answer. A body that
        raises before `forward` abandons what was streamed. Elsewhere (no replicas, a
        forwarded push) the Turn does nothing."""
        key = (header.job_id, header.shard_index)
        with self._lock:
            placement = self._placements.get(key)
            lock = self._turns.setdefault(key, threading.Lock()) if placement else None
            unplaced = lock is None and header.replica_epoch == 0
            if unplaced:
                self._unplaced[key] = self._unplaced.get(key, 0) + 1
        if unplaced:
            try:
                yield Turn(None, header, grad)
            finally:
                self._landed(key)
            return
        if header.replica_epoch != 0:
            yield Turn(None, header, grad)
            return
        turn = Turn(self, header, grad, lock)
        try:
            turn.take(wait=False)
            yield turn
        finally:
            turn.end()

    def _landed(self, key: tuple[str, int]) -> None:
        """An unplaced push (turn) is applied, or failed."""
        with self._drained:
            left = self._unplaced[key] - 1
            if left:
                self._unplaced[key] = left
            else:
                del self._unplaced[key]
                self._drained.notify_all()

    @contextlib.contextmanager
    def shard_turn(self, job_id: str, index: int, timeout: float) -> Iterator[bool]:
        """Holds the shard's turn (no push of it is between its forward and its apply) for
        the body; yields False (not held) if it was not free within `timeout` s. Call once
        the shard has a placement: the workers' pushes that began before it (a shard that
        just got its first copy) hold no turn, so this first waits until they are applied,
        and none begins after."""
        deadline = time.monotonic() + timeout
        key = (job_id, index)
        with self._drained:
            drained = self._drained.wait_for(lambda: key not in self._unplaced, timeout)
            turn = self._turns.setdefault(key, threading.Lock())
        if not drained or not turn.acquire(timeout=max(0.0, deadline - time.monotonic())):
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

    def _forward(self, header: ps_pb2.PushHeader, grad: torch.Tensor, cut_through: bool) -> Forward:
        """A forward of a push to the shard's backups and armed joining copies, as the map
        has them now (call under the shard's turn)."""
        key = (header.job_id, header.shard_index)
        with self._lock:  # armed joining copies count as backups (docs: "Catch-up")
            placement = self._placements.get(key)
            armed = [(j, a) for (j, _), a in self._armed.get(key, {}).items()]
        if placement is None:
            raise ReplicaRefused(grpc.StatusCode.UNAVAILABLE, (
                f"job {header.job_id} shard {header.shard_index} was dropped here; retry"))
        self.check(header)
        targets = [(b, self._backup(a), True) for b, a in placement.backups]
        targets += [(j, self._backup(a), False) for j, a in armed]
        return Forward(header, placement.epoch, grad, targets, cut_through)

    def _settle(self, header: ps_pb2.PushHeader, failure: str | None) -> None:
        """Remembers whether every backup took the push; raises ReplicaRefused if not."""
        key, push = (header.job_id, header.shard_index), _push_id(header)
        with self._lock:
            owed = self._owed.setdefault(key, set())
            if failure is None:
                owed.discard(push)
            elif len(owed) < MAX_OWED:
                owed.add(push)
        if failure is not None:
            raise ReplicaRefused(grpc.StatusCode.UNAVAILABLE, failure)

    def _backup(self, address: str) -> Backup:
        with self._lock:
            backup = self._backups.get(address)
            if backup is None:
                backup = self._backups[address] = Backup(address)
            return backup

    def close(self) -> None:
        with self._lock:
            backups, self._backups = list(self._backups.values()), {}
        for backup in backups:
            backup.close()


class Turn:
    """One push's hold of its shard's turn on the primary (Replicas.turn); with `replicas`
    None, a push that needs none (unreplicated shard, or forwarded to this copy). Used by the
    push's thread only."""

    def __init__(self, replicas: Replicas | None, header: ps_pb2.PushHeader, grad: torch.Tensor,
                 lock: threading.Lock | None = None):
        self._replicas, self._header, self._grad, self._lock = replicas, header, grad, lock
        self._held = False
        self._forward: Forward | None = None
        self._sent = False

    @property
    def on_piece(self) -> OnPiece | None:
        """For the fill: told of each piece as it arrives (None: nothing to stream)."""
        return self._forward.on_piece if self._forward is not None else None

    def take(self, wait: bool) -> None:
        """Takes the shard's turn (only if it is free, unless `wait`), then plans the
        forward: cut-through when the turn was free before the push's first byte."""
        assert self._replicas is not None and self._lock is not None
        self._held = self._lock.acquire(timeout=TURN_WAIT_S) if wait else self._lock.acquire(False)
        if wait and not self._held:
            raise ReplicaRefused(grpc.StatusCode.UNAVAILABLE, (
                f"job {self._header.job_id} shard {self._header.shard_index}: its turn was "
                f"not free within {TURN_WAIT_S:.0f} s; retry"))
        if self._held:
            self._forward = self._replicas._forward(self._header, self._grad, not wait)

    def forward(self) -> str | None:
        """The push is in: takes the turn if it was busy at the start, sends the push on to
        every backup (the rest of it, where it was streamed), and checks again that this
        server is still the primary and in touch, now that the backups have it. Returns the
        way it went (forwarding.Forward.send); None: there was nothing to forward."""
        if self._replicas is None:
            return None
        if not self._held:
            self.take(wait=True)
        assert self._forward is not None
        way = self._forward.send()
        self._sent = True
        self._replicas.check(self._header)
        return way

    def end(self) -> None:
        """After the body: reads the replies of a forwarded push (ReplicaRefused if one did
        not take it), else abandons what was streamed; gives the turn back."""
        try:
            if self._forward is not None and self._sent:
                assert self._replicas is not None
                self._replicas._settle(self._header, self._forward.replies())
            elif self._forward is not None:
                self._forward.cancel()
        finally:
            if self._held:
                assert self._lock is not None
                self._lock.release()
                self._held = False
