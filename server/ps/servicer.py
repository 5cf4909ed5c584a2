"""The ParameterServer gRPC service: translates messages into ShardRegistry/Shard calls.

Bulk messages skip protobuf objects both ways (`add_to_server` installs the codec's reader
for Push and InitShard and sends Pull's messages as built by codec.chunk_messages): a pushed
chunk is decoded from the received bytes straight into the staging gradient, and a pulled
chunk is copied once from the snapshot into its message.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
import torch

from shardps.proto import codec, common_pb2, ps_pb2, ps_pb2_grpc

from .errors import (
    FencedError,
    InvalidConfigError,
    InvalidPushError,
    ShardClosedError,
    ShardError,
    StepAheadError,
    UnknownShardError,
    UnknownWorkerError,
)
from .metrics import PSMetrics
from .registry import ShardRegistry
from .shard import Shard, validate_config

log = logging.getLogger("shardps.ps")

SERVICE_NAME = "shardps.v1.ParameterServer"
MAX_PULL_WAIT_S = 60.0  # a pull never holds a server thread longer than this
_PULL_CHUNK = ps_pb2.PullResponse.DESCRIPTOR.fields_by_name["chunk"].number
_NO_CHUNK = codec.Chunk(0, memoryview(b""))  # what protobuf reads for a message without one

_CODES = {
    UnknownShardError: grpc.StatusCode.NOT_FOUND,
    ShardClosedError: grpc.StatusCode.NOT_FOUND,
    UnknownWorkerError: grpc.StatusCode.FAILED_PRECONDITION,
    FencedError: grpc.StatusCode.FAILED_PRECONDITION,
    StepAheadError: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidPushError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidConfigError: grpc.StatusCode.INVALID_ARGUMENT,
}
_STATUS_NAMES = {
    value: name.removeprefix("PUSH_STATUS_").lower()
    for name, value in ps_pb2.PushStatus.items()
}


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    """Thin translation layer; all decisions live in Shard.

    Thread-safety: handlers run concurrently on the gRPC thread pool; the registry and the
    shards do their own locking, and each stream's ChunkAssembler is local to its handler.
    """

    def __init__(self, shards: ShardRegistry, metrics: PSMetrics):
        self.shards = shards
        self.metrics = metrics
        self._stopping = False

    def shutdown(self) -> None:
        """Ends every waiting pull (UNAVAILABLE); pushes in flight may still finish."""
        self._stopping = True
        self.shards.wake_all()

    def _abort(self, context: grpc.ServicerContext, exc: Exception) -> NoReturn:
        _fail(context, _CODES.get(type(exc), grpc.StatusCode.INVALID_ARGUMENT), str(exc))

    def _reject(self, context: grpc.ServicerContext, exc: Exception, reason: str) -> NoReturn:
        self.metrics.rejected.labels(reason).inc()
        log.debug("push rejected (%s): %s", reason, exc)
        self._abort(context, exc)

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
            self._abort(context, exc)
        return ps_pb2.InitShardResponse(version=shard.version)

    # -- Push ---------------------------------------------------------------------------

    def Push(self, request_iterator: Iterator[codec.ChunkedMessage],
             context: grpc.ServicerContext) -> ps_pb2.PushResponse:
        start = time.perf_counter()
        messages = _chunked(request_iterator)
        first = next(messages, None)
        if first is None or not first.message.HasField("header"):
            self.metrics.rejected.labels("bad_header").inc()
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "first message must carry the header")
        header = first.message.header
        try:
            shard = self.shards.get(header.job_id, header.shard_index)
        except UnknownShardError as exc:
            self._reject(context, exc, exc.reason)
        try:
            codec.torch_dtype(header.dtype)
        except codec.CodecError as exc:
            self._reject(context, exc, "bad_dtype")
        fields = dict(worker_id=header.worker_id, incarnation=header.incarnation,
                      step=header.step, batch_size=header.batch_size)
        try:
            early = shard.check_push(length=header.length, **fields)
        except ShardError as exc:
            self._reject(context, exc, exc.reason)
        if early is not None:
            # Decided by the header alone (JOB_DONE, DUPLICATE, STALE): skip the chunks.
            return self._pushed(shard, early, shard.version, start)

        grad = shard.staging(codec.torch_dtype(header.dtype))  # kept in the wire dtype
        received = 0
        try:
            # Each chunk is checked for NaN/inf as it lands, while it is in cache.
            target = codec.ChunkAssembler(grad, header.dtype, check_finite=True)
            if first.chunk is not None:
                received += len(first.chunk.data)
                target.add(first.chunk)
            for message in messages:
                chunk = message.chunk or _NO_CHUNK
                received += len(chunk.data)
                target.add(chunk)
            target.finish()
        except codec.CodecError as exc:
            shard.release_staging(grad)
            self._reject(context, exc, "bad_chunks")
        if not target.all_finite:
            shard.release_staging(grad)
            self._reject(context, InvalidPushError("gradient has non-finite values", "non_finite"),
                         "non_finite")
        self.metrics.push_bytes.labels(shard.job_id).inc(received)
        applying = time.perf_counter()
        try:
            # push takes `grad` over, also when it raises.
            result = shard.push(grad, base_version=header.base_version, checked=True, **fields)
        except ShardError as exc:
            self._reject(context, exc, exc.reason)
        if result.apply_seconds is not None:  # this push ran a step: time all of its apply
            self.metrics.apply_seconds.observe(time.perf_counter() - applying)
        if result.staleness is not None:
            self.metrics.staleness.labels(shard.job_id).observe(result.staleness)
        return self._pushed(shard, result.status, result.version, start)

    def _pushed(self, shard: Shard, status: int, version: int,
                start: float) -> ps_pb2.PushResponse:
        self.metrics.pushes.labels(shard.job_id, _STATUS_NAMES[status]).inc()
        self.metrics.push_seconds.observe(time.perf_counter() - start)
        return ps_pb2.PushResponse(status=status, version=version)

    # -- Pull ---------------------------------------------------------------------------

    def Pull(self, request: ps_pb2.PullRequest,
             context: grpc.ServicerContext) -> Iterator[ps_pb2.PullResponse | bytes]:
        try:
            shard = self.shards.get(request.job_id, request.shard_index)
            dtype = codec.torch_dtype(request.dtype)
        except (ShardError, codec.CodecError) as exc:
            self._abort(context, exc)
        clock = request.clock if shard.mode == common_pb2.CONSISTENCY_SSP else 0
        timeout = min(max(request.timeout_ms, 0) / 1000, MAX_PULL_WAIT_S)

        def cancelled() -> bool:
            return self._stopping or not context.is_active()

        context.add_callback(shard.wake)  # a client that goes away ends the wait at once
        ready = shard.wait_for_pull(request.min_version, clock, timeout, cancelled)
        if not ready:
            if self._stopping:
                _fail(context, grpc.StatusCode.UNAVAILABLE, "server shutting down")
            if shard.closed:
                self._abort(context, ShardClosedError("shard was dropped or replaced"))
            self.metrics.pulls.labels(shard.job_id).inc()
            yield ps_pb2.PullResponse(ready=False, version=shard.version, length=shard.length,
                                      job_done=shard.frozen)
            return

        start = time.perf_counter()
        try:
            snapshot = shard.snapshot(dtype)
        except ShardError as exc:
            self._abort(context, exc)
        sent = 0
        try:
            head = ps_pb2.PullResponse(ready=True, version=snapshot.version, length=shard.length,
                                       job_done=snapshot.job_done).SerializeToString()
            step = codec.chunk_elements(request.dtype, request.chunk_bytes or codec.DEFAULT_CHUNK_BYTES)
            scratch = torch.empty(min(step, shard.length), dtype=dtype) if dtype != torch.float32 else None
            for lo in range(0, shard.length, step):
                hi = min(lo + step, shard.length)
                # One copy, from the weights (or the snapshot's copy) into the message.
                yield shard.read(snapshot, lo, hi, functools.partial(
                    codec.chunk_message, wire_dtype=request.dtype, field=_PULL_CHUNK, offset=lo,
                    first=head, scratch=scratch))
                head = b""
                sent += (hi - lo) * dtype.itemsize
        finally:
            # Also runs when the client goes away and gRPC closes this generator.
            shard.release(snapshot)
            self.metrics.pulls.labels(shard.job_id).inc()
            self.metrics.pull_bytes.labels(shard.job_id).inc(sent)
            self.metrics.pull_seconds.observe(time.perf_counter() - start)

    # -- info and drop ------------------------------------------------------------------

    def GetShardInfo(self, request: ps_pb2.GetShardInfoRequest,
                     context: grpc.ServicerContext) -> ps_pb2.GetShardInfoResponse:
        return ps_pb2.GetShardInfoResponse(
            shards=[s.info() for s in self.shards.shards(request.job_id)])

    def DropJob(self, request: ps_pb2.DropJobRequest,
                context: grpc.ServicerContext) -> ps_pb2.DropJobResponse:
        if not request.job_id:
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT, "job_id is empty")
        return ps_pb2.DropJobResponse(dropped=self.shards.drop(request.job_id))


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


def _fail(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Ends the RPC with a status (context.abort raises; this tells type checkers so)."""
    context.abort(code, message)
    raise AssertionError("context.abort returned")
