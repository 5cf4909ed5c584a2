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

from shardps.proto import codec, common_pb2, dataplane, ps_pb2
from shardps.psclient.connection import Connection
from shardps.runtime import rpc, sslcontext

_SERVICE = "/shardps.v1.ParameterServer/"
# Pull streams are read on the calling thread instead of a thread of gRPC's per call (measured:
# a 2-shard pull of a small model 2.1 -> 1.2 ms); the drain below reads them in turn anyway.
_CHANNEL_OPTIONS = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]  # type: ignore[attr-defined, unused-ignore]
_PUSH_CHUNK = ps_pb2.PushRequest.DESCRIPTOR.fields_by_name["chunk"].number
_INIT_CHUNK = ps_pb2.InitShardRequest.DESCRIPTOR.fields_by_name["chunk"].number
_read_pull = codec.message_reader(ps_pb2.PullResponse)
_T = TypeVar("_T")
# Shards of at most this many bytes are sent to every server before any reply is read, on the
# calling thread (PSClient._transfer); larger ones each get a thread.
PIPELINE_BYTES = 1024 * 1024


@dataclass
class PullResult:
    """Outcome of a pull across every shard."""

    ready: bool         # every shard reached min_version within the timeout
    versions: list[int]  # per-shard version streamed (or current, if not ready)
    job_done: bool       # some server says the job has ended (weights frozen)


class _Calls:
    """The bulk RPCs of one channel, with codec (de)serializers instead of protobuf's."""

    def __init__(self, channel: grpc.Channel):
        # `_registered_method` (as generated stubs pass it) is not in grpc's type stubs.
        self.push = channel.stream_unary(  # type: ignore[call-arg]
            _SERVICE + "Push", request_serializer=codec.serialized,
            response_deserializer=ps_pb2.PushResponse.FromString, _registered_method=True)
        self.pull = channel.unary_stream(  # type: ignore[call-arg]
            _SERVICE + "Pull", request_serializer=ps_pb2.PullRequest.SerializeToString,
            response_deserializer=_read_pull, _registered_method=True)
        self.init = channel.stream_unary(  # type: ignore[call-arg]
            _SERVICE + "InitShard", request_serializer=codec.serialized,
            response_deserializer=ps_pb2.InitShardResponse.FromString, _registered_method=True)
        self.data_plane = channel.unary_unary(  # type: ignore[call-arg]
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
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        security = rpc.current_security()
        self._tls = sslcontext.client_context(security)
        self._token = security.token

    def connection(self) -> Connection | None:
        """An idle or new data-plane connection, None when this server has no data plane."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.usable():
                    return conn
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
            return Connection(host, port, self._tls, self._token)
        except dataplane.DataPlaneError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.forget_port()
            raise

    def give_back(self, conn: Connection) -> None:
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
                 dtype: common_pb2.DType = common_pb2.DTYPE_FLOAT32,
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
        self._distinct = list(by_address.values())
        # Small shards on several servers: every request goes out before any reply is read.
        itemsize = codec.element_size(dtype)
        self._pipelined = (len(self.shards) > 1 and
                           max(s.length for s in self.shards) * itemsize <= PIPELINE_BYTES)
        self._pool: futures.ThreadPoolExecutor | None = None
        self._ahead: dict[int, tuple[Connection, ps_pb2.PullRequest]] = {}

    @property
    def total(self) -> int:
        return sum(s.length for s in self.shards)

    def close(self) -> None:
        for conn, _ in self._ahead.values():
            conn.close()
        self._ahead.clear()
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
        leave their part of dest untouched and the result is not ready. A pull that `push`
        sent ahead with the same arguments is read instead of sending another.
        """
        self._check_dest(dest)
        requests = [self._pull_request(s, min_version, timeout_s, clock) for s in self.shards]
        parts = [dest[s.offset : s.offset + s.length] for s in self.shards]
        deadline = timeout_s + rpc.TRANSFER_DEADLINE_S

        def start(i: int, conn: Connection, sent: bool) -> None:
            if not sent:
                conn.start_pull(requests[i], deadline)

        def finish(i: int, conn: Connection) -> tuple[bool, int, bool]:
            head = conn.finish_pull(requests[i], parts[i], deadline)
            return head.ready, head.version, head.job_done

        def rpc_path(i: int) -> tuple[bool, int, bool]:
            return self._pull_rpc(i, requests[i], dest, timeout_s)

        replies = self._transfer(requests, start, finish, rpc_path)
        return PullResult(ready=all(r[0] for r in replies), versions=[r[1] for r in replies],
                          job_done=any(r[2] for r in replies))

    def _pull_request(self, shard: common_pb2.ShardRange, min_version: int = 0,
                      timeout_s: float = 30.0, clock: int = 0) -> ps_pb2.PullRequest:
        return ps_pb2.PullRequest(
            job_id=self.job_id, shard_index=shard.index, dtype=self.dtype,
            min_version=min_version, timeout_ms=int(timeout_s * 1000),
            worker_id=self.worker_id, clock=clock, chunk_bytes=self.chunk_bytes)

    def _pull_rpc(self, i: int, request: ps_pb2.PullRequest, dest: torch.Tensor,
                  timeout_s: float) -> tuple[bool, int, bool]:
        stream = self._servers[i].calls.pull(request, timeout=timeout_s + rpc.TRANSFER_DEADLINE_S)
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
             batch_size: int, then_pull: dict[str, Any] | None = None) -> list[ps_pb2.PushResponse]:
        """Sends a flat gradient to every shard; returns each server's reply in shard order.

        `then_pull` (pull's keywords but dest): over a data plane, the next pull's request is
        sent right behind the push, so the servers answer it as soon as its version exists,
        while the caller does other things; a `pull` with the same arguments then reads that
        answer, and one with other arguments discards it. Only worth it where the answer
        cannot depend on when it is sent (sync: version `min_version` is one set of weights).
        """
        self._check_dest(grad)
        bases = base_version if isinstance(base_version, list) else [base_version] * len(self.shards)
        headers = [ps_pb2.PushHeader(
            job_id=self.job_id, shard_index=shard.index, worker_id=self.worker_id,
            incarnation=self.incarnation, step=step, base_version=bases[i],
            dtype=self.dtype, batch_size=batch_size, length=shard.length)
            for i, shard in enumerate(self.shards)]
        parts = [grad[s.offset : s.offset + s.length] for s in self.shards]
        ahead = ([self._pull_request(s, **then_pull) for s in self.shards] if then_pull is not None
                 else None)
        deadline = rpc.TRANSFER_DEADLINE_S

        def start(i: int, conn: Connection, sent: bool) -> None:
            conn.start_push(headers[i], parts[i], self.dtype, deadline)
            if ahead is not None:
                conn.start_pull(ahead[i], deadline)

        def finish(i: int, conn: Connection) -> ps_pb2.PushResponse:
            reply = conn.finish_push(deadline)
            if ahead is not None:
                self._ahead[i] = (conn, ahead[i])  # kept out of the pool until pull reads it
            return reply

        def rpc_path(i: int) -> ps_pb2.PushResponse:
            first = ps_pb2.PushRequest(header=headers[i]).SerializeToString()
            messages = codec.chunk_messages(parts[i], self.dtype, _PUSH_CHUNK, self.chunk_bytes, first)
            return self._servers[i].calls.push(messages, timeout=deadline)

        return self._transfer(None, start, finish, rpc_path)

    def _take(self, i: int, request: ps_pb2.PullRequest | None) -> tuple[Connection | None, bool]:
        """A data-plane connection for shard i (None: its server has none) and whether
        `request` is already on it (sent ahead by push); a pull sent ahead with other
        arguments is dropped with its connection."""
        held = self._ahead.pop(i, None)
        if held is not None:
            if request is not None and held[1] == request:
                return held[0], True
            held[0].close()
        return self._servers[i].connection(), False

    def _release(self, i: int, conn: Connection) -> None:
        if self._ahead.get(i, (None,))[0] is not conn:
            self._servers[i].give_back(conn)

    def _transfer(self, requests: list[ps_pb2.PullRequest] | None,
                  start: Callable[[int, Connection, bool], None],
                  finish: Callable[[int, Connection], _T],
                  rpc_path: Callable[[int], _T]) -> list[_T]:
        """One operation on every shard: start + finish over each server's data plane, or
        rpc_path where a server has none. Small shards (at most PIPELINE_BYTES) are started
        on every server before any is finished, all on the calling thread (hand-offs between
        threads cost more than small transfers take); larger ones run a thread per shard
        (_each). `requests`: pulls, which may already have been sent ahead."""
        if not self._pipelined:
            def one(i: int) -> _T:
                conn, sent = self._take(i, requests[i] if requests else None)
                if conn is None:
                    return rpc_path(i)
                try:
                    start(i, conn, sent)
                    return finish(i, conn)
                finally:
                    self._release(i, conn)

            return self._each(one)
        taken: list[tuple[Connection | None, bool]] = []
        results: dict[int, _T] = {}
        try:
            for i in range(len(self.shards)):
                taken.append(self._take(i, requests[i] if requests else None))
            error: Exception | None = None
            started = []
            for i, (conn, sent) in enumerate(taken):
                if conn is None:
                    continue
                try:
                    start(i, conn, sent)
                except Exception as exc:
                    error = exc
                    break
                started.append(i)
            for i in started:
                try:
                    results[i] = finish(i, taken[i][0])  # type: ignore[arg-type]
                except Exception as exc:
                    error = error or exc
            if error is None:
                for i, (conn, _) in enumerate(taken):
                    if conn is None:  # a server without a data plane
                        results[i] = rpc_path(i)
            if error is not None:
                raise error
            return [results[i] for i in range(len(self.shards))]
        finally:
            for i, (conn, sent) in enumerate(taken):
                if conn is not None:
                    if sent and i not in results:
                        conn.close()  # an answer sent ahead is still on its way: out of step
                    self._release(i, conn)

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
            return self._servers[i].calls.init(messages, timeout=rpc.TRANSFER_DEADLINE_S)

        self._each(one)

    def _check_dest(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self.total or flat.device.type != "cpu":
            raise ValueError(
                f"expected a flat CPU tensor of {self.total} elements, got {tuple(flat.shape)} on {flat.device}")

