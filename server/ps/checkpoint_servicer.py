"""The checkpoint RPCs (Checkpoint, ListCheckpoints) on top of the ParameterServer servicer,
and a fault hook for tests: `SHARDPS_FAULT_DROP_PUSH_REPLY=N` makes the server handle its N-th
push normally and then answer UNAVAILABLE instead of the reply, as if the reply had been lost
on the way back (the worker retries it: the retry must be a DUPLICATE)."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Iterator

import grpc

from shardps.proto import ps_pb2

from .checkpointer import Checkpointer
from .metrics import PSMetrics
from .registry import ShardRegistry
from .servicer import ParameterServerServicer, _fail

log = logging.getLogger("shardps.ps")

MAX_CHECKPOINT_WAIT_S = 60.0
NO_DATA_DIR = "this server has no --data-dir: checkpoints are off"
DROP_REPLY_ENV = "SHARDPS_FAULT_DROP_PUSH_REPLY"


class DropReplies:
    """Which pushes lose their reply: the N-th handled by this process, from `spec` "N"
    (test hook; "" never). Thread-safe."""

    def __init__(self, spec: str):
        self.nth = int(spec) if spec.isdigit() and int(spec) > 0 else 0
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self.dropped = 0

    def drop(self) -> bool:
        if not self.nth:
            return False
        with self._lock:
            hit = next(self._count) == self.nth
            self.dropped += hit
        return hit


class CheckpointingServicer(ParameterServerServicer):
    """ParameterServerServicer plus the checkpoint RPCs; `checkpointer` None = no data dir.

    Thread-safety: as the base class; the Checkpointer serialises writes.
    """

    def __init__(self, shards: ShardRegistry, metrics: PSMetrics,
                 checkpointer: Checkpointer | None):
        super().__init__(shards, metrics)
        self.checkpointer = checkpointer
        self.faults = DropReplies(os.environ.get(DROP_REPLY_ENV, ""))

    def Push(self, request_iterator: Iterator[ps_pb2.PushRequest],
             context: grpc.ServicerContext) -> ps_pb2.PushResponse:
        reply = super().Push(request_iterator, context)
        if self.faults.drop():
            log.warning("fault injected (%s): push handled (%s, version %d), reply dropped",
                        DROP_REPLY_ENV, ps_pb2.PushStatus.Name(reply.status), reply.version)
            _fail(context, grpc.StatusCode.UNAVAILABLE, "fault injected: push reply dropped")
        return reply

    def Checkpoint(self, request: ps_pb2.CheckpointRequest,
                   context: grpc.ServicerContext) -> ps_pb2.CheckpointResponse:
        if self.checkpointer is None:
            _fail(context, grpc.StatusCode.FAILED_PRECONDITION, NO_DATA_DIR)
        if not request.job_id:
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT, "job_id is empty")
        shards = self.shards.shards(request.job_id)
        if not shards:
            _fail(context, grpc.StatusCode.NOT_FOUND, "unknown job or shard")
        timeout = min(max(request.timeout_ms, 0) / 1000, MAX_CHECKPOINT_WAIT_S)
        reply = ps_pb2.CheckpointResponse()
        for shard in shards:
            version, path = self.checkpointer.checkpoint_now(shard, request.at_version, timeout)
            if path is None:
                _fail(context, grpc.StatusCode.INTERNAL, "checkpoint write failed; see the "
                      "server log")
            reply.shards.add(job_id=shard.job_id, shard_index=shard.index, version=version,
                             path=str(path))
        return reply

    def ListCheckpoints(self, request: ps_pb2.ListCheckpointsRequest,
                        context: grpc.ServicerContext) -> ps_pb2.ListCheckpointsResponse:
        if self.checkpointer is None:
            _fail(context, grpc.StatusCode.FAILED_PRECONDITION, NO_DATA_DIR)
        reply = ps_pb2.ListCheckpointsResponse()
        for job_id, index, version, path in self.checkpointer.listing(request.job_id):
            reply.checkpoints.add(job_id=job_id, shard_index=index, version=version,
                                  path=str(path))
        return reply
