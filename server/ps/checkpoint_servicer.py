"""The checkpoint RPCs (Checkpoint, ListCheckpoints) on top of the ParameterServer servicer."""

from __future__ import annotations

import logging
import os

import grpc

from shardps.proto import ps_pb2

from .bulk import DROP_REPLY_ENV, DropReplies
from .checkpointer import Checkpointer
from .metrics import PSMetrics
from .registry import ShardRegistry
from .servicer import ParameterServerServicer, _fail, check_job_id

log = logging.getLogger("shardps.ps")

MAX_CHECKPOINT_WAIT_S = 60.0
NO_DATA_DIR = "this server has no --data-dir: checkpoints are off"


class CheckpointingServicer(ParameterServerServicer):
    """ParameterServerServicer plus the checkpoint RPCs; `checkpointer` None = no data dir.
    Pushes honour the fault hook in $SHARDPS_FAULT_DROP_PUSH_REPLY (bulk.DropReplies).

    Thread-safety: as the base class; the Checkpointer serialises writes.
    """

    def __init__(self, shards: ShardRegistry, metrics: PSMetrics,
                 checkpointer: Checkpointer | None):
        super().__init__(shards, metrics, DropReplies(os.environ.get(DROP_REPLY_ENV, "")))
        self.checkpointer = checkpointer

    def Checkpoint(self, request: ps_pb2.CheckpointRequest,
                   context: grpc.ServicerContext) -> ps_pb2.CheckpointResponse:
        if self.checkpointer is None:
            _fail(context, grpc.StatusCode.FAILED_PRECONDITION, NO_DATA_DIR)
        check_job_id(context, request.job_id)
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
        check_job_id(context, request.job_id, allow_empty=True)
        reply = ps_pb2.ListCheckpointsResponse()
        for job_id, index, version, path in self.checkpointer.listing(request.job_id):
            reply.checkpoints.add(job_id=job_id, shard_index=index, version=version,
                                  path=str(path))
        return reply
