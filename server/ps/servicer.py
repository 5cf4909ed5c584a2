"""The ParameterServer gRPC service: translates messages into ShardRegistry/Shard calls.

Bulk messages skip protobuf objects both ways (`add_to_server` installs the codec's reader
for Push and InitShard and sends Pull's messages as built by codec.chunk_messages): a pushed
chunk is decoded from the received bytes straight into the staging gradient, and a pulled
chunk is copied once from the snapshot into its message. Push and Pull share their handling
with the data plane (bulk.py, dataserver.py).

Every identifier a request carries (job ids, worker ids) is checked against the one rule of
proto/names.py before anything else happens (INVALID_ARGUMENT, quoting at most a bounded,
escaped prefix of it); no reply names a path on the server except the Checkpoint and
ListCheckpoints results, whose purpose that is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
import torch

from shardps.proto import codec, dataplane, names, ps_pb2, ps_pb2_grpc

from .bulk import BulkOps, DropReplies, Refused, refusal
from .errors import ShardError
from .metrics import PSMetrics
from .registry import ShardRegistry
from .shard import Shard
from .shard_config import validate_config

log = logging.getLogger("shardps.ps")

SERVICE_NAME = "shardps.v1.ParameterServer"
_PULL_CHUNK = ps_pb2.PullResponse.DESCRIPTOR.fields_by_name["chunk"].number
_NO_CHUNK = codec.Chunk(0, memoryview(b""))  # what protobuf reads for a message without one


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    """Thin translation layer; push and pull live in BulkOps, all decisions in Shard.

    Thread-safety: handlers run concurrently on the gRPC thread pool; the registry and the
    shards do their own locking, and each stream's ChunkAssembler is local to its handler.
    """

    def __init__(self, shards: ShardRegistry, metrics: PSMetrics, faults: DropReplies | None = None):
        self.shards = shards
        self.metrics = metrics
        self.bulk = BulkOps(shards, metrics, faults or DropReplies(""))
        self.data_port = 0  # the data plane's port, once the daemon has one

    def shutdown(self) -> None:
        """Ends every waiting pull (UNAVAILABLE); pushes in flight may still finish."""
        self.bulk.stopping = True
        self.shards.wake_all()

    # -- InitShard ----------------------------------------------------------------------

    def InitShard(self, request_iterator: Iterator[codec.ChunkedMessage],
                  context: grpc.ServicerContext) -> ps_pb2.InitShardResponse:
        messages = _chunked(request_iterator)
        first = next(messages, None)
        if first is None or not first.message.HasField("config"):
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "first message must carry the config")
        config = first.message.config
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
            target = codec.ChunkAssembler(weights, first.message.dtype)
            if first.chunk is not None:
                target.add(first.chunk)
            for message in messages:
                target.add(message.chunk or _NO_CHUNK)
            shard = Shard(config, target.finish())
            self.shards.put(shard)  # with a data dir, this may resume from a checkpoint
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

    def Push(self, request_iterator: Iterator[codec.ChunkedMessage],
             context: grpc.ServicerContext) -> ps_pb2.PushResponse:
        messages = _chunked(request_iterator)
        first = next(messages, None)
        if first is None or not first.message.HasField("header"):
            self.metrics.rejected.labels("bad_header").inc()
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "first message must carry the header")

        def fill(grad: torch.Tensor) -> tuple[int, bool]:
            # Each chunk is checked for NaN/inf as it lands, while it is in cache.
            target = codec.ChunkAssembler(grad, first.message.header.dtype, check_finite=True)
            received = 0
            if first.chunk is not None:
                received += len(first.chunk.data)
                target.add(first.chunk)
            for message in messages:
                chunk = message.chunk or _NO_CHUNK
                received += len(chunk.data)
                target.add(chunk)
            target.finish()
            return received, target.all_finite

        try:
            reply = self.bulk.push(first.message.header, fill)
        except Refused as exc:
            _refuse(context, exc)
        if self.bulk.faults.drop(reply):
            _fail(context, grpc.StatusCode.UNAVAILABLE, "fault injected: push reply dropped")
        return reply

    # -- Pull ---------------------------------------------------------------------------

    def Pull(self, request: ps_pb2.PullRequest,
             context: grpc.ServicerContext) -> Iterator[ps_pb2.PullResponse | bytes]:
        try:
            plan = self.bulk.pull(request, context.is_active, context.add_callback)
        except Refused as exc:
            _refuse(context, exc)
        if plan.snapshot is None:
            yield plan.head
            return
        sent = 0
        try:
            head = plan.head.SerializeToString()
            step = codec.chunk_elements(request.dtype, request.chunk_bytes or codec.DEFAULT_CHUNK_BYTES)
            scratch = (torch.empty(min(step, plan.shard.length), dtype=plan.dtype)
                       if plan.dtype != torch.float32 else None)

            def message(lo: int, view: torch.Tensor) -> bytes:
                # One copy, from the weights (or the snapshot's copy) into the message.
                return codec.chunk_message(view, request.dtype, _PULL_CHUNK, lo,
                                           first=head if lo == 0 else b"", scratch=scratch)

            for piece in self.bulk.pieces(plan, step, message):
                yield piece
                sent += len(piece)
        finally:
            # Also runs when the client goes away and gRPC closes this generator.
            self.bulk.pulled(plan, sent)

    # -- info, drop and the data plane ----------------------------------------------------

    def GetShardInfo(self, request: ps_pb2.GetShardInfoRequest,
                     context: grpc.ServicerContext) -> ps_pb2.GetShardInfoResponse:
        check_job_id(context, request.job_id, allow_empty=True)
        return ps_pb2.GetShardInfoResponse(
            shards=[s.info() for s in self.shards.shards(request.job_id)])

    def DropJob(self, request: ps_pb2.DropJobRequest,
                context: grpc.ServicerContext) -> ps_pb2.DropJobResponse:
        check_job_id(context, request.job_id)
        return ps_pb2.DropJobResponse(dropped=self.shards.drop(request.job_id))

    def GetDataPlane(self, request: ps_pb2.GetDataPlaneRequest,
                     context: grpc.ServicerContext) -> ps_pb2.GetDataPlaneResponse:
        return ps_pb2.GetDataPlaneResponse(port=self.data_port, protocol=dataplane.PROTOCOL)


def add_to_server(servicer: ps_pb2_grpc.ParameterServerServicer, server: grpc.Server) -> None:
    """Registers the servicer as the generated code would, but with the codec's reader for
    Push and InitShard messages and raw bytes for Pull's (see the module docstring)."""
    capture = _HandlerCapture()
    ps_pb2_grpc.add_ParameterServerServicer_to_server(servicer, capture)
    handlers = dict(capture.handlers)
    handlers["Push"] = grpc.stream_unary_rpc_method_handler(
        servicer.Push, request_deserializer=codec.message_reader(ps_pb2.PushRequest),
        response_serializer=ps_pb2.PushResponse.SerializeToString)
    handlers["InitShard"] = grpc.stream_unary_rpc_method_handler(
        servicer.InitShard, request_deserializer=codec.message_reader(ps_pb2.InitShardRequest),
        response_serializer=ps_pb2.InitShardResponse.SerializeToString)
    handlers["Pull"] = grpc.unary_stream_rpc_method_handler(
        servicer.Pull, request_deserializer=ps_pb2.PullRequest.FromString,
        response_serializer=codec.serialized)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class _HandlerCapture:
    """Stands in for a grpc.Server to collect the generated method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers.update(handlers)


def _chunked(messages: Iterator[Any]) -> Iterator[codec.ChunkedMessage]:
    """The stream as ChunkedMessages; a servicer registered with the generated code instead of
    `add_to_server` receives protobuf messages, which are wrapped here."""
    for message in messages:
        if isinstance(message, codec.ChunkedMessage):
            yield message
        elif message.HasField("chunk"):
            yield codec.ChunkedMessage(message, codec.Chunk(message.chunk.offset,
                                                            memoryview(message.chunk.data)))
        else:
            yield codec.ChunkedMessage(message, None)


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


def _refuse(context: grpc.ServicerContext, exc: Refused) -> NoReturn:
    _fail(context, exc.code, str(exc))


def _fail(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Ends the RPC with a status (context.abort raises; this tells type checkers so)."""
    context.abort(code, message)
    raise AssertionError("context.abort returned")
