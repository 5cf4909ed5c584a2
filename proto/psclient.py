"""PSClient: pulls and pushes a job's flat vector across all its shards in parallel.

Shared by workers (training) and the client (export). It speaks only the ParameterServer
service and the codec; the caller owns the flat CPU tensors it reads from or writes into.
Thread-safety: one PSClient per thread of use (its pool runs one call per shard at a time).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from shardps.proto import codec, common_pb2, ps_pb2, ps_pb2_grpc, rpc


@dataclass
class PullResult:
    """Outcome of a pull across every shard."""

    ready: bool         # every shard reached min_version within the timeout
    versions: list[int]  # per-shard version streamed (or current, if not ready)
    job_done: bool       # some server says the job has ended (weights frozen)


class PSClient:
    """Parallel pull/push of one job's flat vector over its shard map."""

    def __init__(self, job_id: str, shard_map: common_pb2.ShardMap, *,
                 dtype: int = common_pb2.DTYPE_FLOAT32,
                 chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                 worker_id: str = "", incarnation: int = 0):
        self.job_id = job_id
        self.shards = list(shard_map.shards)
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.worker_id = worker_id
        self.incarnation = incarnation
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs = []
        for shard in self.shards:
            if shard.address not in self._channels:
                self._channels[shard.address] = rpc.make_channel(shard.address)
            self._stubs.append(ps_pb2_grpc.ParameterServerStub(self._channels[shard.address]))
        self._pool = futures.ThreadPoolExecutor(max_workers=max(1, len(self.shards)),
                                                thread_name_prefix="psclient")

    @property
    def total(self) -> int:
        return sum(s.length for s in self.shards)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _each(self, fn, *args):
        """Runs fn(index, shard, stub, *args) for every shard in parallel; returns results."""
        jobs = [self._pool.submit(fn, i, s, self._stubs[i], *args) for i, s in enumerate(self.shards)]
        return [j.result() for j in jobs]

    # -- pull ---------------------------------------------------------------------------

    def pull(self, dest: torch.Tensor, *, min_version: int = 0, timeout_s: float = 30.0,
             clock: int = 0) -> PullResult:
        """Fills dest (flat, CPU, fp32 or the wire dtype) with every shard's weights.

        Waits up to timeout_s on the servers for min_version; shards that did not reach it
        leave their part of dest untouched and the result is not ready.
        """
        self._check_dest(dest)
        replies = self._each(self._pull_one, dest, min_version, timeout_s, clock)
        return PullResult(ready=all(r[0] for r in replies), versions=[r[1] for r in replies],
                          job_done=any(r[2] for r in replies))

    def _pull_one(self, index, shard, stub, dest, min_version, timeout_s, clock):
        request = ps_pb2.PullRequest(
            job_id=self.job_id, shard_index=shard.index, dtype=self.dtype,
            min_version=min_version, timeout_ms=int(timeout_s * 1000),
            worker_id=self.worker_id, clock=clock, chunk_bytes=self.chunk_bytes)
        stream = stub.Pull(request, timeout=timeout_s + rpc.TRANSFER_DEADLINE_S)
        first = next(stream, None)
        if first is None:
            raise codec.CodecError(f"shard {shard.index}: empty pull stream")
        if not first.ready:
            stream.cancel()
            return False, first.version, first.job_done
        if first.length != shard.length:
            stream.cancel()
            raise codec.CodecError(
                f"shard {shard.index}: server holds {first.length} elements, map says {shard.length}")
        target = codec.ChunkAssembler(dest[shard.offset : shard.offset + shard.length], self.dtype)
        if first.HasField("chunk"):
            target.add(first.chunk)
        for reply in stream:
            target.add(reply.chunk)
        target.finish()
        return True, first.version, first.job_done

    # -- push ---------------------------------------------------------------------------

    def push(self, grad: torch.Tensor, *, step: int, base_version: int | list[int],
             batch_size: int) -> list[ps_pb2.PushResponse]:
        """Sends a flat gradient to every shard; returns each server's reply in shard order."""
        self._check_dest(grad)
        bases = base_version if isinstance(base_version, list) else [base_version] * len(self.shards)
        return self._each(self._push_one, grad, step, bases, batch_size)

    def _push_one(self, index, shard, stub, grad, step, bases, batch_size):
        header = ps_pb2.PushHeader(
            job_id=self.job_id, shard_index=shard.index, worker_id=self.worker_id,
            incarnation=self.incarnation, step=step, base_version=bases[index],
            dtype=self.dtype, batch_size=batch_size, length=shard.length)
        part = grad[shard.offset : shard.offset + shard.length]
        return stub.Push(self._push_messages(header, part), timeout=rpc.TRANSFER_DEADLINE_S)

    def _push_messages(self, header: ps_pb2.PushHeader, part: torch.Tensor) -> Iterator[ps_pb2.PushRequest]:
        yield ps_pb2.PushRequest(header=header)
        for chunk in codec.iter_chunks(part, self.dtype, self.chunk_bytes):
            yield ps_pb2.PushRequest(chunk=chunk)

    # -- init ---------------------------------------------------------------------------

    def init(self, weights: torch.Tensor, config: ps_pb2.ShardConfig) -> None:
        """Creates every shard from the flat initial weights; config's per-shard fields are filled in."""
        self._check_dest(weights)
        self._each(self._init_one, weights, config)

    def _init_one(self, index, shard, stub, weights, config):
        cfg = ps_pb2.ShardConfig()
        cfg.CopyFrom(config)
        cfg.job_id = self.job_id
        cfg.shard_index = shard.index
        cfg.offset = shard.offset
        cfg.length = shard.length
        cfg.total = self.total
        part = weights[shard.offset : shard.offset + shard.length]

        def messages():
            yield ps_pb2.InitShardRequest(config=cfg, dtype=common_pb2.DTYPE_FLOAT32)
            for chunk in codec.iter_chunks(part, common_pb2.DTYPE_FLOAT32, self.chunk_bytes):
                yield ps_pb2.InitShardRequest(chunk=chunk)

        return stub.InitShard(messages(), timeout=rpc.TRANSFER_DEADLINE_S)

    def _check_dest(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self.total or flat.device.type != "cpu":
            raise ValueError(
                f"expected a flat CPU tensor of {self.total} elements, got {tuple(flat.shape)} on {flat.device}")
