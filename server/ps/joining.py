"""The joining copy's half of catch-up by transfer (docs/architecture.md, "Catch-up by
transfer"): once the primary has called JoinShard (under the shard's turn, just before it
captures the state), pushes it forwards are queued here (not applied: the shard's state has
not arrived); TransferShard
brings the state as a checkpoint's files, which are read and checked as a checkpoint is
(checkpoint.read), installed as the shard, and then the queued pushes are replayed in the
order they came. From then on the copy takes forwarded pushes as a backup does, and reports
itself caught up with every heartbeat until the coordinator makes it a backup.

Thread-safe: one lock per join, held by a queued push and by the install, so a forwarded push
is either queued before the install or applied after the replay.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from shardps.proto import coordinator_pb2, names, ps_pb2

from . import checkpoint, compressed
from .errors import ShardError
from .registry import ShardRegistry
from .replication import JOINING, Placement
from .shard import Shard

log = logging.getLogger("shardps.ps")

# Forwarded pushes held per join before its state arrives: at most this many, and bytes.
MAX_QUEUED, MAX_QUEUED_BYTES = 4096, 2 << 30
# The files a transfer may carry, and a bound on their bytes (4 tensors of 2**32 fp32 each).
FILES = frozenset({checkpoint.MANIFEST, *(f"{n}.bin" for n in checkpoint.TENSORS)})
MAX_TRANSFER_BYTES = 4 * 4 * 2**32 + checkpoint.MAX_MANIFEST_BYTES


class TransferRefused(Exception):
    """A transfer or forwarded push this joiner must refuse; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class _Join:
    join_epoch: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    queue: list[tuple[ps_pb2.PushHeader, torch.Tensor]] = field(default_factory=list)
    installed: bool = False


class Joining:
    """This server's joining copies, by (job id, shard index)."""

    def __init__(self, shards: ShardRegistry, self_id: Callable[[], str]):
        self._shards = shards
        self._self_id = self_id
        self._lock = threading.Lock()
        self._joins: dict[tuple[str, int], _Join] = {}

    def begin(self, request: ps_pb2.JoinShardRequest) -> ps_pb2.JoinShardResponse:
        """JoinShard: a fresh queue for the join (an older join of the shard ends)."""
        _check_job_id(request.job_id)
        key = (request.job_id, request.shard_index)
        with self._lock:
            join = self._joins.get(key)
            if join is not None and join.join_epoch > request.join_epoch:
                raise TransferRefused(grpc.StatusCode.FAILED_PRECONDITION, (
                    f"job {request.job_id} shard {request.shard_index}: joining at join epoch "
                    f"{join.join_epoch} here, not {request.join_epoch}"))
            self._joins[key] = _Join(request.join_epoch)
        log.info("job %s shard %d: joining as a copy (join epoch %d); queueing forwarded "
                 "pushes until the state arrives", request.job_id, request.shard_index,
                 request.join_epoch)
        return ps_pb2.JoinShardResponse()

    def placement_changed(self, job_id: str, index: int, placement: Placement) -> None:
        """A Replicas.on_placement hook: a map at or past the join's epoch that no longer
        names this server joining under that epoch ends the join (a backup now, or
        dropped)."""
        me = self._self_id()
        with self._lock:
            join = self._joins.get((job_id, index))
            if join is None or placement.epoch < join.join_epoch:
                return
            if placement.role(me) != JOINING or placement.join_epoch(me) != join.join_epoch:
                del self._joins[(job_id, index)]

    def queue(self, header: ps_pb2.PushHeader,
              fill: Callable[[torch.Tensor, None], tuple[int, bool]]) -> ps_pb2.PushResponse | None:
        """A forwarded push to a shard joining here whose state has not arrived: reads and
        queues it (ACCEPTED). None: not such a push, take it the usual way."""
        if header.replica_epoch == 0:
            return None
        with self._lock:
            join = self._joins.get((header.job_id, header.shard_index))
        if join is None:
            return None
        with join.lock:
            if join.installed:
                return None
            dtype = compressed.staging_dtype(header)
            held = sum(g.nbytes for _, g in join.queue) + header.length * dtype.itemsize
            if len(join.queue) >= MAX_QUEUED or held > MAX_QUEUED_BYTES:
                raise TransferRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                    f"job {header.job_id} shard {header.shard_index}: {len(join.queue)} pushes "
                    "queued while joining (the bound); the state has not arrived"))
            grad = torch.empty(header.length, dtype=dtype)
            fill(grad, None)
            kept = ps_pb2.PushHeader()
            kept.CopyFrom(header)
            join.queue.append((kept, grad))
        return ps_pb2.PushResponse(status=ps_pb2.PUSH_STATUS_ACCEPTED)

    def caught_up(self) -> list[coordinator_pb2.ShardVersion]:
        """The joins installed and replayed (reported with every heartbeat)."""
        with self._lock:
            return [coordinator_pb2.ShardVersion(job_id=j, shard_index=i, version=join.join_epoch)
                    for (j, i), join in self._joins.items() if join.installed]

    def receive(self, requests: Iterable[ps_pb2.TransferShardRequest]) -> ps_pb2.TransferShardResponse:
        """TransferShard: reads the files, checks them as a checkpoint, installs the shard and
        replays the queue. Raises TransferRefused (nothing installed)."""
        it = iter(requests)
        first = next(it, None)
        if first is None:
            raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT, "empty transfer")
        _check_job_id(first.job_id)
        key = (first.job_id, first.shard_index)
        with self._lock:
            join = self._joins.get(key)
        if join is None or join.join_epoch != first.join_epoch:
            raise TransferRefused(grpc.StatusCode.FAILED_PRECONDITION, (
                f"job {first.job_id} shard {first.shard_index}: not joining here at join epoch "
                f"{first.join_epoch}"))
        with tempfile.TemporaryDirectory(prefix="shardps-join-") as tmp:
            _write_files(Path(tmp), it)
            try:
                state = checkpoint.read(Path(tmp), checkpoint.Expect(*key))
            except checkpoint.CheckpointError as exc:
                raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"transferred state: {exc}") from None
        return self._install(join, state)

    def _install(self, join: _Join, state: checkpoint.ShardState) -> ps_pb2.TransferShardResponse:
        state.config.resume_from_job = ""  # its state is here already
        with join.lock:
            if join.installed:
                raise TransferRefused(grpc.StatusCode.ALREADY_EXISTS, "already installed")
            shard = Shard.from_state(state)
            shard.restored = False  # a new timeline here: older checkpoints are not its own
            self._shards.put(shard)
            for header, grad in join.queue:
                _replay(shard, header, grad)
            drained, join.queue = len(join.queue), []
            join.installed = True
        log.info("job %s shard %d: state of version %d installed, %d queued push(es) replayed "
                 "(version %d now); caught up", state.job_id, state.index, state.version,
                 drained, shard.version)
        return ps_pb2.TransferShardResponse(version=state.version, drained=drained)


def _replay(shard: Shard, header: ps_pb2.PushHeader, grad: torch.Tensor) -> None:
    """Applies one queued forwarded push as the push path would (a push the state already
    holds is a DUPLICATE or STALE and changes nothing)."""
    try:
        early = shard.check_push(length=header.length, worker_id=header.worker_id,
                                 incarnation=header.incarnation, step=header.step,
                                 batch_size=header.batch_size)
        if early is not None:
            return
        staged = shard.staging(grad.dtype)
        staged.copy_(grad)
        shard.push(staged, base_version=header.base_version, checked=True,
                   worker_id=header.worker_id, incarnation=header.incarnation,
                   step=header.step, batch_size=header.batch_size)
    except ShardError as exc:  # as a backup refusing it would (the primary saw the same)
        log.warning("job %s shard %d: queued push of %s step %d refused on replay: %s",
                    header.job_id, header.shard_index, header.worker_id, header.step, exc)


def _write_files(directory: Path, requests: Iterable[ps_pb2.TransferShardRequest]) -> None:
    """Writes the chunks into `directory`, each file's chunks in offset order."""
    sizes: dict[str, int] = {}
    total = 0
    for request in requests:
        if request.file not in FILES:
            raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"file {names.shown(request.file)} is not a checkpoint file")
        if request.offset != sizes.get(request.file, 0):
            raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT, (
                f"file {request.file}: chunk at offset {request.offset}, expected "
                f"{sizes.get(request.file, 0)}"))
        total += len(request.data)
        if total > MAX_TRANSFER_BYTES:
            raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT, "transfer too large")
        with open(directory / request.file, "ab") as f:
            f.write(request.data)
        sizes[request.file] = request.offset + len(request.data)


def _check_job_id(job_id: str) -> None:
    """Raises TransferRefused INVALID_ARGUMENT for a job id that is not a valid name."""
    try:
        names.check(job_id, "job_id")
    except names.InvalidName as exc:
        raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
