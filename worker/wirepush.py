"""What one job's pushes and pulls put on the wire, as the worker sees it: the compressed
push (transport.compress) with error feedback, one residual per shard, and the byte counts
behind shardps_worker_wire_bytes_total and shardps_worker_compression_ratio (of pushes).

Owned by the job's training thread (as JobShards is); not thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardps.proto import codec, common_pb2, compress
from shardps.worker.feedback import ErrorFeedback
from shardps.worker.metrics import WorkerMetrics


class WirePush:
    """One job's wire form of its gradient and the bytes its transfers carry.

    `setting` is the spec's transport.compress: "none" pushes the gradient in `dtype`;
    anything else encodes each shard's slice with error feedback (`encode`) from step
    `warmup_steps` on (transport.compress_warmup_steps; before it, pushes are uncompressed
    and the residuals untouched), and `reset`
    drops the residuals when the job's weights are replaced (a rollback or a rewind), since
    they are owed to steps that will be replayed.
    """

    def __init__(self, setting: str, dtype: common_pb2.DType, job_id: str,
                 metrics: WorkerMetrics, warmup_steps: int = 0):
        self.warmup_steps = warmup_steps  # steps 0..warmup_steps-1 push in `dtype`
        self.feedback = None if setting == "none" else ErrorFeedback(compress.parse(setting))
        self._itemsize = codec.element_size(dtype)
        self._bytes = metrics.wire_bytes
        self._ratio = metrics.compression_ratio.labels(job=job_id)
        self._job = job_id

    def encode(self, grad: torch.Tensor, shards: Sequence[common_pb2.ShardRange],
               step: int) -> list[bytes] | None:
        """Each shard's slice of grad (flat fp32) in the compressed wire form, the residual
        carried in and the new one kept; None when pushes are not compressed (or `step` is in
        the warm-up). Called once a step: retries of that push resend the same bytes (so a
        DUPLICATE costs nothing)."""
        if self.feedback is None or step < self.warmup_steps:
            return None
        return [self.feedback.compress(f"shard{s.index}", grad[s.offset : s.offset + s.length])
                for s in shards]

    def reset(self) -> None:
        if self.feedback is not None:
            self.feedback.reset()

    def pushed(self, numel: int, encoded: Sequence[bytes] | None) -> None:
        """Counts one push's payload (elements or encodings; frame headers not included)."""
        sent = sum(map(len, encoded)) if encoded is not None else numel * self._itemsize
        self._bytes.labels(job=self._job, direction="push").inc(sent)
        if sent:
            self._ratio.set(numel * 4 / sent)  # against fp32

    def pulled(self, received: int) -> None:
        """Counts one ready pull's payload bytes (PullResult.wire_bytes)."""
        self._bytes.labels(job=self._job, direction="pull").inc(received)
