"""The ParameterServer gRPC service: translates messages into ShardRegistry/Shard calls.

Registered with the generated code and standard protobuf serialization, so any client that
speaks ps.proto works (this is the fallback bulk path and the way clients in other languages
come in; PSClient prefers a server's data plane, dataserver.py). Push and Pull share their
handling with the data plane (bulk.py): a pushed chunk is decoded into the staging gradient
as it arrives, and a pulled chunk is copied once under the shard's lock, from the snapshot
into the bytes of its message.

Every identifier a request carries (job ids, worker ids) is checked against the one rule of
proto/names.py before anything else happens (INVALID_ARGUMENT, quoting at most a bounded,
escaped prefix of it); no reply names a path on the server except the Checkpoint and
ListCheckpoints results, whose purpose that is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc
import torch

from shardps.proto import codec, common_pb2, dataplane, names, ps_pb2, ps_pb2_grpc

from . import compressed, pieces
from .bulk import BulkOps, DropReplies, Refused, refusal
from .errors import InvalidConfigError, ShardError
from .forwarding import OnPiece
from .joining import TransferRefused
from .metrics import PSMetrics
from .registry import ShardRegistry
from .rowservice import RowService
from .shard import Shard
from .shard_config import validate_config

log = logging.getLogger("shardps.ps")

SERVICE_NAME = "shardps.v1.ParameterServer"


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    """Thin translation layer; push and pull live in BulkOps, all decisions in Shard.

    Thread-safety: handlers run concurrently on the gRPC thread pool; the registry and the
    shards do their own locking, and each stream's ChunkAssembler is local to its handler.
    Register it with `ps_pb2_grpc.add_ParameterServerServicer_to_server`.
    """

    def __init__(self, shards: ShardRegistry, metrics: PSMetrics, faults: DropReplies | None = None):
        self.shards = shards
        self.metrics = metrics
        self.bulk = BulkOps(shards, metrics, faults or DropReplies(""))
        self.data_port = 0  # the data plane's port, once the daemon has one
        self.rows = RowService(shards)

    def shutdown(self) -> None:
        """Ends every waiting pull (UNAVAILABLE); pushes in flight may still finish."""
        self.bulk.stopping = self.rows.stopping = True
        self.shards.wake_all()

    # -- InitShard ----------------------------------------------------------------------

    def InitShard(self, request_iterator: Iterator[ps_pb2.InitShardRequest],
                  context: grpc.ServicerContext) -> ps_pb2.InitShardResponse:
        first = next(request_iterator, None)
        if first is None or not first.HasField("config"):
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "first message must carry the config")
        config = first.config
        try:
            check_config_ids(config)
        except names.InvalidName as exc:
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            validate_config(config)
            try:
                weights = torch.empty(config.length, dtype=torch.float32)
            except RuntimeError:
                _fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "cannot allocate the shard")
            target = codec.ChunkAssembler(weights, first.dtype)
            _assemble(target, first, request_iterator)
            shard = Shard(config, target.finish())
            self.shards.put(shard)  # with a data dir, this may resume from a checkpoint
            self.bulk.replicas.adopt(config.job_id, config.replica_map)
        except (ShardError, codec.CodecError) as exc:
            log.info("InitShard for job %s shard %d refused: %s", config.job_id,
                     config.shard_index, exc)
            _refuse(context, refusal(exc))
        except OSError as exc:  # the checkpoint directory (the log has the path, not the reply)
            log.error("InitShard for job %s shard %d failed: %s", config.job_id,
                      config.shard_index, exc)
            _fail(context, grpc.StatusCode.INTERNAL,
                  "cannot create the shard's checkpoint directory; see the server log")
        return ps_pb2.InitShardResponse(version=shard.version)

    # -- Push ---------------------------------------------------------------------------

    def Push(self, request_iterator: Iterator[ps_pb2.PushRequest],
             context: grpc.ServicerContext) -> ps_pb2.PushResponse:
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            self.metrics.rejected.labels("bad_header").inc()
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "first message must carry the header")
        header = first.header
        if header.pieces:  # the Push RPC's chunks carry their own offsets
            self.metrics.rejected.labels(pieces.REASON).inc()
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "pieces: a data-plane push field; over the Push RPC send chunks")

        def fill(grad: torch.Tensor, on_piece: OnPiece | None) -> tuple[int, bool]:
            del on_piece  # chunks come in any order here: the push is forwarded whole
            if compressed.is_compressed(header):  # size bounded by bulk.push's check_header
                body = compressed.BodyAssembler(header.compressed_bytes)
                _assemble(body, first, request_iterator)
                return compressed.decode_into(header, body.finish(), grad)
            # Each chunk is checked for NaN/inf as it lands, while it is in cache.
            target = codec.ChunkAssembler(grad, header.dtype, check_finite=True)
            _assemble(target, first, request_iterator)
            target.finish()
            return target.received * grad.element_size(), target.all_finite

        try:
            reply = self.bulk.push(header, fill)
        except Refused as exc:
            _refuse(context, exc)
        if self.bulk.faults.drop(reply):
            _fail(context, grpc.StatusCode.UNAVAILABLE, "fault injected: push reply dropped")
        return reply

    # -- Pull ---------------------------------------------------------------------------

    def Pull(self, request: ps_pb2.PullRequest,
             context: grpc.ServicerContext) -> Iterator[ps_pb2.PullResponse]:
        try:
            plan = self.bulk.pull(request, context.is_active, context.add_callback)
        except Refused as exc:
            _refuse(context, exc)
        if plan.snapshot is None:
            yield plan.head
            return
        sent = 0
        if plan.delta is not None:  # a compressed pull: the encoding's bytes as the chunks
            try:
                yield from _delta_stream(plan.head, plan.delta, request.chunk_bytes)
                sent = len(plan.delta)
            finally:
                self.bulk.pulled(plan, sent)
            return
        try:
            step = codec.chunk_elements(request.dtype, request.chunk_bytes or codec.DEFAULT_CHUNK_BYTES)

            def encoded(lo: int, view: torch.Tensor) -> tuple[int, bytes]:
                # One copy (and the cast), under the lock, from the weights or the snapshot.
                return lo, codec.encode(view, request.dtype)

            reply = plan.head  # the first message carries the head's fields and the first chunk
            for lo, data in self.bulk.pieces(plan, step, encoded):
                reply.chunk.offset, reply.chunk.data = lo, data
                yield reply
                reply = ps_pb2.PullResponse()
                sent += len(data)
        finally:
            # Also runs when the client goes away and gRPC closes this generator.
            self.bulk.pulled(plan, sent)

    # -- info, drop and the data plane ----------------------------------------------------

    def GetShardInfo(self, request: ps_pb2.GetShardInfoRequest,
                     context: grpc.ServicerContext) -> ps_pb2.GetShardInfoResponse:
        check_job_id(context, request.job_id, allow_empty=True)
        infos = [s.info() for s in self.shards.shards(request.job_id)]
        for info in infos:
            info.replica_epoch, info.replica_role = self.bulk.replicas.describe(
                info.job_id, info.shard_index)
        return ps_pb2.GetShardInfoResponse(shards=infos)

    def GetPreconditioner(self, request: ps_pb2.GetPreconditionerRequest,
                          context: grpc.ServicerContext) -> Iterator[ps_pb2.GetPreconditionerResponse]:
        """The frozen denominator of a shard whose job preconditions its pushes, in chunks
        (a copy taken under the shard's lock, so no chunk waits on it)."""
        check_job_id(context, request.job_id)
        try:
            denominator = self.shards.get(request.job_id, request.shard_index).preconditioner()
        except InvalidConfigError as exc:
            _fail(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ShardError as exc:
            _refuse(context, refusal(exc))
        n = denominator.numel()
        step = codec.chunk_elements(common_pb2.DTYPE_FLOAT32, request.chunk_bytes)
        for lo in range(0, max(n, 1), step):
            yield ps_pb2.GetPreconditionerResponse(
                denominator=denominator[lo : lo + step].numpy().tobytes(), offset_elements=lo,
                length_elements=n)

    def TransferShard(self, request_iterator: Iterator[ps_pb2.TransferShardRequest],
                      context: grpc.ServicerContext) -> ps_pb2.TransferShardResponse:
        """A joining copy receives its shard's state from the primary (joining.py)."""
        try:
            return self.bulk.joining.receive(request_iterator)
        except TransferRefused as exc:
            _fail(context, exc.code, str(exc))

    def JoinShard(self, request: ps_pb2.JoinShardRequest,
                  context: grpc.ServicerContext) -> ps_pb2.JoinShardResponse:
        try:
            return self.bulk.joining.begin(request)
        except TransferRefused as exc:
            _fail(context, exc.code, str(exc))

    def DropJob(self, request: ps_pb2.DropJobRequest,
                context: grpc.ServicerContext) -> ps_pb2.DropJobResponse:
        check_job_id(context, request.job_id)
        self.bulk.replicas.forget(request.job_id)
        return ps_pb2.DropJobResponse(dropped=self.shards.drop(request.job_id))

    # -- embedding tables (rowservice.py) ------------------------------------------------

    def InitRows(self, request: ps_pb2.InitRowsRequest,
                 context: grpc.ServicerContext) -> ps_pb2.InitRowsResponse:
        return _refusing(context, lambda: self.rows.init_rows(request))

    def PullRows(self, request: ps_pb2.PullRowsRequest,
                 context: grpc.ServicerContext) -> ps_pb2.PullRowsResponse:
        return _refusing(context, lambda: self.rows.pull_rows(request, context.is_active))

    def PushRows(self, request: ps_pb2.PushRowsRequest,
                 context: grpc.ServicerContext) -> ps_pb2.PushRowsResponse:
        return _refusing(context, lambda: self.rows.push_rows(request))

    def ExportRows(self, request: ps_pb2.ExportRowsRequest,
                   context: grpc.ServicerContext) -> ps_pb2.ExportRowsResponse:
        return _refusing(context, lambda: self.rows.export_rows(request, context.is_active))

    def GetDataPlane(self, request: ps_pb2.GetDataPlaneRequest,
                     context: grpc.ServicerContext) -> ps_pb2.GetDataPlaneResponse:
        return ps_pb2.GetDataPlaneResponse(port=self.data_port, protocol=dataplane.PROTOCOL)


def _delta_stream(head: ps_pb2.PullResponse, delta: bytes,
                  chunk_bytes: int) -> Iterator[ps_pb2.PullResponse]:
    """A compressed pull's messages: the head with the first chunk of the delta's bytes, then
    one chunk per message, offsets counting bytes."""
    step = codec.chunk_elements(common_pb2.DTYPE_FLOAT32, chunk_bytes) * 4
    reply = head
    for lo in range(0, len(delta), step):
        reply.chunk.offset, reply.chunk.data = lo, delta[lo : lo + step]
        yield reply
        reply = ps_pb2.PullResponse()


def _assemble(target: codec.ChunkAssembler | compressed.BodyAssembler,
              first: ps_pb2.PushRequest | ps_pb2.InitShardRequest,
              rest: Iterator[ps_pb2.PushRequest] | Iterator[ps_pb2.InitShardRequest]) -> None:
    """Adds the chunks of a bulk stream in order: the first message's, if it has one, then one
    per later message (a later message without one adds an empty chunk at offset 0, which
    fails the offset check unless nothing came before)."""
    if first.HasField("chunk"):
        target.add(first.chunk)
    for message in rest:
        target.add(message.chunk)


def check_config_ids(config: ps_pb2.ShardConfig) -> None:
    """Raises names.InvalidName unless every identifier in an InitShard config is valid."""
    names.check(config.job_id, "config.job_id")
    if config.resume_from_job:
        names.check(config.resume_from_job, "config.resume_from_job")
    for worker in config.workers:
        names.check(worker, "config.workers")


def check_job_id(context: grpc.ServicerContext, job_id: str, allow_empty: bool = False) -> None:
    """Ends the RPC with INVALID_ARGUMENT unless `job_id` is a valid id ("" when allowed: every
    job)."""
    if not job_id:
        if not allow_empty:
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT, "job_id is empty")
        return
    try:
        names.check(job_id, "job_id")
    except names.InvalidName as exc:
        _fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))


R = TypeVar("R")


def _refuse(context: grpc.ServicerContext, exc: Refused) -> NoReturn:
    _fail(context, exc.code, str(exc))


def _refusing(context: grpc.ServicerContext, call: Callable[[], R]) -> R:
    """`call()`'s reply; a Refused ends the RPC with its status."""
    try:
        return call()
    except Refused as exc:
        _refuse(context, exc)


def _fail(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Ends the RPC with a status, the message cut to names.MAX_ERROR (context.abort raises;
    this tells type checkers so)."""
    context.abort(code, names.cut(message))
    raise AssertionError("context.abort returned")
