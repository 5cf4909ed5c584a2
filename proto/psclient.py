"""PSClient: pulls and pushes a job's flat vector across all its shards in parallel.

Shared by workers (training) and the client (export). It speaks only the ParameterServer
service, its data plane and the codec; the caller owns the flat CPU tensors it reads from or
writes into.

Two transports, same meaning: a server's data plane (proto/dataplane.py: raw frames over TCP,
sent from and received straight into the tensors) when it has one and `data_plane` is on, else
the Push and Pull RPCs, whose bulk messages bypass protobuf objects (codec.chunk_messages /
codec.message_reader). Shards transfer in parallel: every shard but the last on a thread of
this client's own pool, the last on the calling thread (gRPC pushes run their senders on
gRPC's threads instead). Errors are grpc.RpcErrors on both transports.
Thread-safety: one PSClient per thread of use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.experimental
import torch

from shardps.proto import codec, common_pb2, dataplane, ps_pb2, rpc

_SERVICE = "/shardps.v1.ParameterServer/"
# Pull streams are read on the calling thread instead of a thread of gRPC's per call (measured:
# a 2-shard pull of a small model 2.1 -> 1.2 ms); the drain below reads them in turn anyway.
_CHANNEL_OPTIONS = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
_PUSH_CHUNK = ps_pb2.PushRequest.DESCRIPTOR.fields_by_name["chunk"].number
_INIT_CHUNK = ps_pb2.InitShardRequest.DESCRIPTOR.fields_by_name["chunk"].number
_read_pull = codec.message_reader(ps_pb2.PullResponse)
_T = TypeVar("_T")


@dataclass
class PullResult:
    """Outcome of a pull across every shard."""

    ready: bool         # every shard reached min_version within the timeout
    versions: list[int]  # per-shard version streamed (or current, if not ready)
    job_done: bool       # some server says the job has ended (weights frozen)


class _Calls:
    """The bulk RPCs of one channel, with codec (de)serializers instead of protobuf's."""

    def __init__(self, channel: grpc.Channel):
        self.push = channel.stream_unary(
            _SERVICE + "Push", request_serializer=codec.serialized,
            response_deserializer=ps_pb2.PushResponse.FromString, _registered_method=True)
        self.pull = channel.unary_stream(
            _SERVICE + "Pull", request_serializer=ps_pb2.PullRequest.SerializeToString,
            response_deserializer=_read_pull, _registered_method=True)
        self.init = channel.stream_unary(
            _SERVICE + "InitShard", request_serializer=codec.serialized,
            response_deserializer=ps_pb2.InitShardResponse.FromString, _registered_method=True)
        self.data_plane = channel.unary_unary(
            _SERVICE + "GetDataPlane", request_serializer=ps_pb2.GetDataPlaneRequest.SerializeToString,
            response_deserializer=ps_pb2.GetDataPlaneResponse.FromString, _registered_method=True)


class _Server:
    """One server of the map: its gRPC calls and, when it has one, idle connections to its
    data plane. The data port is asked for on first use and again after a connection to it
    fails (a restarted server listens elsewhere). Thread-safe."""

    def __init__(self, address: str, use_data_plane: bool):
        self.address = address
        self.channel = rpc.make_channel(address, _CHANNEL_OPTIONS)
        self.calls = _Calls(self.channel)
        self._port: int | None = None if use_data_plane else 0
        self._idle: list[dataplane.Connection] = []
        self._lock = threading.Lock()
        security = rpc.current_security()
        self._tls = dataplane.client_context(security)
        self._token = security.token

    def connection(self) -> dataplane.Connection | None:
        """An idle or new data-plane connection, None when this server has no data plane."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
            port = self._port
        if port is None:
            try:
                reply = self.calls.data_plane(ps_pb2.GetDataPlaneRequest(), timeout=rpc.CONTROL_DEADLINE_S)
                port = reply.port if reply.protocol == dataplane.PROTOCOL else 0
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # a server from before it
                    raise
                port = 0
            with self._lock:
                self._port = port
        if not port:
            return None
        host = self.address.rsplit(":", 1)[0].strip("[]")
        try:
            return dataplane.Connection(host, port, self._tls, self._token)
        except dataplane.DataPlaneError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.forget_port()
            raise

    def give_back(self, conn: dataplane.Connection) -> None:
        if conn.closed:
            self.forget_port()  # it failed: ask again next time (cheap, and a restart moves it)
            return
        with self._lock:
            self._idle.append(conn)

    def forget_port(self) -> None:
        with self._lock:
            if self._port:
                self._port = None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        self.channel.close()


class PSClient:
    """Parallel pull/push of one job's flat vector over its shard map."""

    def __init__(self, job_id: str, shard_map: common_pb2.ShardMap, *,
                 dtype: int = common_pb2.DTYPE_FLOAT32,
                 chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                 worker_id: str = "", incarnation: int = 0, data_plane: bool = True):
        """`data_plane`: use the servers' data planes where they have one (else gRPC only);
        `chunk_bytes` sizes the gRPC messages."""
        self.job_id = job_id
        self.shards = list(shard_map.shards)
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.worker_id = worker_id
        self.incarnation = incarnation
        by_address: dict[str, _Server] = {}
        for shard in self.shards:
            if shard.address not in by_address:
                by_address[shard.address] = _Server(shard.address, data_plane)
        self._servers = [by_address[s.address] for s in self.shards]
        self._calls = [server.calls for server in self._servers]
        self._distinct = list(by_address.values())
        self._pool: futures.ThreadPoolExecutor | None = None

    @property
    def total(self) -> int:
        return sum(s.length for s in self.shards)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for server in self._distinct:
            server.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pull ---------------------------------------------------------------------------

    def pull(self, dest: torch.Tensor, *, min_version: int = 0, timeout_s: float = 30.0,
             clock: int = 0) -> PullResult:
        """Fills dest (flat, CPU, fp32 or the wire dtype) with every shard's weights.

        Waits up to timeout_s on the servers for min_version; shards that did not reach it
        leave their part of dest untouched and the result is not ready.
        """
        self._check_dest(dest)

        def one(i: int) -> tuple[bool, int, bool]:
            shard, server = self.shards[i], self._servers[i]
            request = ps_pb2.PullRequest(
                job_id=self.job_id, shard_index=shard.index, dtype=self.dtype,
                min_version=min_version, timeout_ms=int(timeout_s * 1000),
                worker_id=self.worker_id, clock=clock, chunk_bytes=self.chunk_bytes)
            part = dest[shard.offset : shard.offset + shard.length]
            conn = server.connection()
            if conn is None:
                return self._pull_rpc(i, request, dest, timeout_s)
            try:
                head = conn.pull(request, part, timeout_s + rpc.TRANSFER_DEADLINE_S)
            finally:
                server.give_back(conn)
            return head.ready, head.version, head.job_done

        replies = self._each(one)
        return PullResult(ready=all(r[0] for r in replies), versions=[r[1] for r in replies],
                          job_done=any(r[2] for r in replies))

    def _pull_rpc(self, i: int, request: ps_pb2.PullRequest, dest: torch.Tensor,
                  timeout_s: float) -> tuple[bool, int, bool]:
        stream = self._calls[i].pull(request, timeout=timeout_s + rpc.TRANSFER_DEADLINE_S)
        try:
            return self._drain(self.shards[i], stream, dest)
        finally:
            stream.cancel()  # a no-op once finished; ends it on error

    def _drain(self, shard: common_pb2.ShardRange, stream: Iterator[codec.ChunkedMessage],
               dest: torch.Tensor) -> tuple[bool, int, bool]:
        first = next(stream, None)
        if first is None:
            raise codec.CodecError(f"shard {shard.index}: empty pull stream")
        head = first.message
        if not head.ready:
            return False, head.version, head.job_done
        if head.length != shard.length:
            raise codec.CodecError(
                f"shard {shard.index}: server holds {head.length} elements, map says {shard.length}")
        target = codec.ChunkAssembler(dest[shard.offset : shard.offset + shard.length], self.dtype)
        if first.chunk is not None:
            target.add(first.chunk)
        for reply in stream:
            if reply.chunk is None:
                raise codec.CodecError(f"shard {shard.index}: a pull message without a chunk")
            target.add(reply.chunk)
        target.finish()
        return True, head.version, head.job_done

    # -- push ---------------------------------------------------------------------------

    def push(self, grad: torch.Tensor, *, step: int, base_version: int | list[int],
             batch_size: int) -> list[ps_pb2.PushResponse]:
        """Sends a flat gradient to every shard; returns each server's reply in shard order."""
        self._check_dest(grad)
        bases = base_version if isinstance(base_version, list) else [base_version] * len(self.shards)

        def one(i: int) -> ps_pb2.PushResponse:
            shard, server = self.shards[i], self._servers[i]
            header = ps_pb2.PushHeader(
                job_id=self.job_id, shard_index=shard.index, worker_id=self.worker_id,
                incarnation=self.incarnation, step=step, base_version=bases[i],
                dtype=self.dtype, batch_size=batch_size, length=shard.length)
            part = grad[shard.offset : shard.offset + shard.length]
            conn = server.connection()
            if conn is None:
                first = ps_pb2.PushRequest(header=header).SerializeToString()
                messages = codec.chunk_messages(part, self.dtype, _PUSH_CHUNK, self.chunk_bytes, first)
                return self._calls[i].push(messages, timeout=rpc.TRANSFER_DEADLINE_S)
            try:
                return conn.push(header, part, self.dtype, rpc.TRANSFER_DEADLINE_S)
            finally:
                server.give_back(conn)

        return self._each(one)

    def _each(self, fn: Callable[[int], _T]) -> list[_T]:
        """fn(i) for every shard, concurrently; the results in shard order.

        Every shard but the last runs on this client's pool, the last on the calling thread;
        every call is waited for before the first error is raised, so no transfer of this
        operation is still running when the caller retries it.
        """
        n = len(self.shards)
        if n <= 1:
            return [fn(i) for i in range(n)]
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(n - 1, thread_name_prefix="psclient")
        background = [self._pool.submit(fn, i) for i in range(n - 1)]
        error: BaseException | None = None
        last: Any = None
        try:
            last = fn(n - 1)
        except Exception as exc:  # raised below, once the others are done
            error = exc
        results: list = []
        for future in background:
            try:
                results.append(future.result())
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return [*results, last]

    # -- init ---------------------------------------------------------------------------

    def init(self, weights: torch.Tensor, config: ps_pb2.ShardConfig) -> None:
        """Creates every shard from the flat initial weights; config's per-shard fields are filled in."""
        self._check_dest(weights)

        def one(i: int) -> ps_pb2.InitShardResponse:
            shard = self.shards[i]
            cfg = ps_pb2.ShardConfig()
            cfg.CopyFrom(config)
            cfg.job_id = self.job_id
            cfg.shard_index = shard.index
            cfg.offset = shard.offset
            cfg.length = shard.length
            cfg.total = self.total
            first = ps_pb2.InitShardRequest(config=cfg, dtype=common_pb2.DTYPE_FLOAT32).SerializeToString()
            part = weights[shard.offset : shard.offset + shard.length]
            messages = codec.chunk_messages(part, common_pb2.DTYPE_FLOAT32, _INIT_CHUNK,
                                            self.chunk_bytes, first)
            return self._calls[i].init(messages, timeout=rpc.TRANSFER_DEADLINE_S)

        self._each(one)

    def _check_dest(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self.total or flat.device.type != "cpu":
            raise ValueError(
                f"expected a flat CPU tensor of {self.total} elements, got {tuple(flat.shape)} on {flat.device}")

