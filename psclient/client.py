"""PSClient: pulls and pushes a job's flat vector across all its shards in parallel.

Shared by workers (training) and the client (export). It speaks only the ParameterServer
service, its data plane and the codec; the caller owns the flat CPU tensors it reads from or
writes into.

Each server is reached through one `Transport` (transport.py): its data plane (plane.py) when
it has one and `data_plane` is on, else the Push and Pull RPCs (rpcpath.py), which mean
exactly the same. Shards transfer in parallel: small ones are all sent before any reply is
read, on the calling thread; larger ones each get a thread (every shard but the last on this
client's own pool, the last on the calling thread). Errors are grpc.RpcErrors on both
transports. Thread-safety: one PSClient per thread of use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TypeVar

import torch

from shardps.proto import codec, common_pb2, compress, ps_pb2
from shardps.psclient.deltas import PulledCopy
from shardps.psclient.inflight import PullInFlight
from shardps.psclient.overlapped import Lane, OverlappedPush
from shardps.psclient.plane import DataPlaneTransport
from shardps.psclient.rpcpath import RpcTransport
from shardps.psclient.transport import PendingPull, PendingPush, PullWatch, Transport

_P = TypeVar("_P", PendingPush, PendingPull)
_T = TypeVar("_T")
# Shards of at most this many bytes are sent to every server before any reply is read, on the
# calling thread (PSClient._transfer); larger ones each get a thread.
PIPELINE_BYTES = 1024 * 1024
# `pull`'s keywords but dest (min_version, timeout_s, clock), as `push(then_pull=...)` takes them.
PullArgs = Mapping[str, float]
_PULL_KEYS = frozenset({"min_version", "timeout_s", "clock"})


@dataclass
class PullResult:
    """Outcome of a pull across every shard."""

    ready: bool         # every shard reached min_version within the timeout
    versions: list[int]  # per-shard version streamed (or current, if not ready)
    job_done: bool       # some server says the job has ended (weights frozen)
    wire_bytes: int = 0  # payload bytes received: elements, or compressed pulls' deltas


def _mark_compressed(header: ps_pb2.PushHeader, data: bytes) -> None:
    """Fills a push header's compression fields (30-39) for the encoding `data`."""
    codec_number = compress.codec_of(data)
    if codec_number not in compress.PUSH_COMPRESSIONS:
        raise ValueError(f"shard {header.shard_index}: not an encoding (codec {codec_number})")
    header.compression = compress.PUSH_COMPRESSIONS[codec_number]
    header.compressed_bytes = len(data)
    header.dtype = common_pb2.DTYPE_FLOAT32  # what the servers decode it to


class _Server:
    """One server of the map: its RPCs (InitShard, GetDataPlane, and the fallback transport)
    and its data plane, when it has one and the client may use it. Thread-safe."""

    def __init__(self, address: str, data_plane: bool, chunk_bytes: int):
        self.rpc = RpcTransport(address, chunk_bytes)
        self.plane = DataPlaneTransport(address, self.rpc.data_port) if data_plane else None

    def transport(self) -> Transport:
        return self.plane if self.plane is not None and self.plane.available() else self.rpc

    def close(self) -> None:
        if self.plane is not None:
            self.plane.close()
        self.rpc.close()


def _same_pull(a: ps_pb2.PullRequest, b: ps_pb2.PullRequest) -> bool:
    """Whether two pull requests ask for the same thing (a compressed pull's reply_tag is
    fresh for every request, so it does not count)."""
    if a.reply_tag == b.reply_tag:
        return a == b
    untagged = []
    for request in (a, b):
        copy = ps_pb2.PullRequest()
        copy.CopyFrom(request)
        copy.reply_tag = 0
        untagged.append(copy)
    return untagged[0] == untagged[1]


class PullsAhead:
    """The pulls `push(then_pull=...)` sent right behind its pushes, one per shard (None where
    the server's transport sent none), until `pull` reads those whose request matches its own
    and drops the others. Each holds its data-plane connection until then. Owned by the
    PSClient's thread."""

    def __init__(self, pending: Sequence[PendingPull | None] = ()):
        self._pending = list(pending)

    def take(self, i: int, request: ps_pb2.PullRequest) -> PendingPull | None:
        """Shard i's pull sent ahead if it asked for `request` (dropped otherwise)."""
        held = self._pending[i] if i < len(self._pending) else None
        if held is None:
            return None
        self._pending[i] = None
        if _same_pull(held.request, request):
            return held
        held.cancel()
        return None

    def cancel(self) -> None:
        """Drops every pull still ahead (and its connection)."""
        pending, self._pending = self._pending, []
        for held in pending:
            if held is not None:
                held.cancel()


def _push_headers(client: PSClient, step: int, base_version: int | list[int],
                  batch_size: int) -> list[ps_pb2.PushHeader]:
    """Each shard's push header, in shard order."""
    shards = client.shards
    bases = base_version if isinstance(base_version, list) else [base_version] * len(shards)
    return [ps_pb2.PushHeader(
        job_id=client.job_id, shard_index=shard.index, worker_id=client.worker_id,
        incarnation=client.incarnation, step=step, base_version=bases[i],
        dtype=client.dtype, batch_size=batch_size, length=shard.length,
        rollback_id=client.rollback_id)
        for i, shard in enumerate(shards)]


def _check_flat(flat: torch.Tensor, total: int) -> None:
    if flat.dim() != 1 or flat.numel() != total or flat.device.type != "cpu":
        raise ValueError(
            f"expected a flat CPU tensor of {total} elements, got {tuple(flat.shape)} on {flat.device}")


class PSClient:
    """Parallel pull/push of one job's flat vector over its shard map."""

    def __init__(self, job_id: str, shard_map: common_pb2.ShardMap, *,
                 dtype: common_pb2.DType = common_pb2.DTYPE_FLOAT32,
                 chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                 worker_id: str = "", incarnation: int = 0, data_plane: bool = True,
                 compress_pull: str = "none"):
        """`data_plane`: use the servers' data planes where they have one (else gRPC only);
        `chunk_bytes` sizes the gRPC messages; `compress_pull` a proto/compress.py setting
        for compressed pulls (fp32 only), "none" for dense ones."""
        self.job_id = job_id
        self.shards = list(shard_map.shards)
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.worker_id = worker_id
        self.incarnation = incarnation
        self.rollback_id: int | None = None  # PushHeader.rollback_id; None: not sent
        by_address: dict[str, _Server] = {}
        for shard in self.shards:
            if shard.address not in by_address:
                by_address[shard.address] = _Server(shard.address, data_plane, chunk_bytes)
        self._servers = [by_address[s.address] for s in self.shards]
        self._distinct = list(by_address.values())
        # Small shards on several servers: every request goes out before any reply is read.
        itemsize = codec.element_size(dtype)
        self._pipelined = (len(self.shards) > 1 and
                           max(s.length for s in self.shards) * itemsize <= PIPELINE_BYTES)
        self._pool: futures.ThreadPoolExecutor | None = None
        self._ahead = PullsAhead()
        # Compressed pulls' copy (deltas.py); a new map's client may take it over (`carries`).
        self.pulled = PulledCopy(compress_pull, self.total, dtype) if compress_pull != "none" else None

    @property
    def total(self) -> int:
        return sum(s.length for s in self.shards)

    def close(self) -> None:
        self._ahead.cancel()
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
        _check_flat(dest, self.total)
        requests = [self._pull_request(s, min_version, timeout_s, clock) for s in self.shards]
        ahead, self._ahead = self._ahead, PullsAhead()

        def start(i: int) -> PendingPull:
            held = ahead.take(i, requests[i])
            return held if held is not None else self._servers[i].transport().start_pull(requests[i])

        def finish(i: int, pending: PendingPull) -> ps_pb2.PullResponse:
            shard = self.shards[i]
            part = dest[shard.offset : shard.offset + shard.length]
            return pending.finish(part) if self.pulled is None else self.pulled.finish(shard, pending, part)

        try:
            heads = self._transfer(start, finish)
        finally:
            ahead.cancel()  # those not taken (an error stopped the pull before them)
        itemsize = codec.element_size(self.dtype)
        received = sum(h.compressed_bytes if h.delta_compression else h.length * itemsize
                       for h in heads if h.ready)
        return PullResult(ready=all(h.ready for h in heads), versions=[h.version for h in heads],
                          job_done=any(h.job_done for h in heads), wire_bytes=received)

    def start_pull(self, dest: torch.Tensor, *, min_version: int = 0, timeout_s: float = 30.0,
                   clock: int = 0) -> PullInFlight:
        """`pull`, read on background threads (psclient/inflight.py): its heads, then dest
        range by range as the elements land. Dense pulls only."""
        _check_flat(dest, self.total)
        if self.pulled is not None:  # a compressed pull's deltas land whole
            raise ValueError("an overlapped pull is dense: this client compresses pulls")
        requests = [self._pull_request(s, min_version, timeout_s, clock) for s in self.shards]
        ahead, self._ahead = self._ahead, PullsAhead()
        held = [ahead.take(i, requests[i]) for i in range(len(self.shards))]
        ahead.cancel()

        def read(i: int, watch: PullWatch) -> ps_pb2.PullResponse:
            pending = held[i] or self._servers[i].transport().start_pull(requests[i])
            return pending.finish(dest[self.shards[i].offset :][: self.shards[i].length], watch)

        return PullInFlight(self.shards, read, codec.element_size(self.dtype), timeout_s)

    def _pull_request(self, shard: common_pb2.ShardRange, min_version: int = 0,
                      timeout_s: float = 30.0, clock: int = 0) -> ps_pb2.PullRequest:
        request = ps_pb2.PullRequest(
            job_id=self.job_id, shard_index=shard.index, dtype=self.dtype,
            min_version=min_version, timeout_ms=int(timeout_s * 1000),
            worker_id=self.worker_id, clock=clock, chunk_bytes=self.chunk_bytes)
        if self.pulled is not None:
            self.pulled.tag(request)
        return request

    # -- push ---------------------------------------------------------------------------

    def push(self, grad: torch.Tensor, *, step: int, base_version: int | list[int],
             batch_size: int, then_pull: PullArgs | None = None,
             encoded: Sequence[bytes] | None = None) -> list[ps_pb2.PushResponse]:
        """Sends a flat gradient to every shard; returns each server's reply in shard order.

        `then_pull` (pull's keywords but dest): over a data plane, the next pull's request is
        sent right behind the push, so the servers answer it as soon as its version exists,
        while the caller does other things; a `pull` with the same arguments then reads that
        answer, and one with other arguments discards it. Only worth it where the answer
        cannot depend on when it is sent (sync: version `min_version` is one set of weights).

        `encoded`: a compressed push, one proto/compress.py encoding per shard, in shard
        order, sent instead of grad's elements (the servers apply their decode).
        """
        _check_flat(grad, self.total)
        if encoded is not None and len(encoded) != len(self.shards):
            raise ValueError(f"{len(encoded)} encodings for {len(self.shards)} shards")
        self._ahead.cancel()
        headers = _push_headers(self, step, base_version, batch_size)
        if encoded is not None:
            for header, data in zip(headers, encoded, strict=True):
                _mark_compressed(header, data)
        ahead = [self._ahead_request(s, then_pull) for s in self.shards]
        pulls: list[PendingPull | None] = [None] * len(self.shards)

        def start(i: int) -> PendingPush:
            shard = self.shards[i]
            part = grad[shard.offset : shard.offset + shard.length] if encoded is None else encoded[i]
            return self._servers[i].transport().start_push(headers[i], part, ahead[i])

        def finish(i: int, pending: PendingPush) -> ps_pb2.PushResponse:
            reply, pulls[i] = pending.finish()
            return reply

        try:
            return self._transfer(start, finish)
        finally:
            self._ahead = PullsAhead(pulls)

    def begin_push(self, grad: torch.Tensor, *, step: int, base_version: int | list[int],
                   batch_size: int, buckets: Sequence[tuple[int, int]],
                   then_pull: PullArgs | None = None,
                   on_wait: Callable[[float], None] | None = None) -> OverlappedPush:
        """A push of `grad` sent bucket by bucket (flat ranges covering it) as the caller
        marks them final (psclient/overlapped.py); its `finish` returns what `push` does.
        Raises grpc.RpcError if a server cannot be reached (nothing is left open then)."""
        _check_flat(grad, self.total)
        self._ahead.cancel()
        self._ahead, headers = PullsAhead(), _push_headers(self, step, base_version, batch_size)
        lanes = [Lane(shard, headers[i], self._servers[i].transport(),
                      self._ahead_request(shard, then_pull)) for i, shard in enumerate(self.shards)]
        return OverlappedPush(grad, lanes, buckets, self._pulls_ahead, on_wait)

    def _pulls_ahead(self, pulls: list[PendingPull | None]) -> None:
        self._ahead = PullsAhead(pulls)

    def _ahead_request(self, shard: common_pb2.ShardRange,
                       args: PullArgs | None) -> ps_pb2.PullRequest | None:
        if args is None:
            return None
        if not set(args) <= _PULL_KEYS:
            raise TypeError(f"then_pull takes {sorted(_PULL_KEYS)}, got {sorted(args)}")
        return self._pull_request(shard, int(args.get("min_version", 0)),
                                  float(args.get("timeout_s", 30.0)), int(args.get("clock", 0)))

    # -- both ---------------------------------------------------------------------------

    def _transfer(self, start: Callable[[int], _P], finish: Callable[[int, _P], _T]) -> list[_T]:
        """One operation on every shard: start(i) sends shard i's request, finish(i, pending)
        reads its reply. Small shards (at most PIPELINE_BYTES) are all started before any is
        finished, on the calling thread (hand-offs between threads cost more than small
        transfers take); larger ones run a thread per shard (_each). Every started request is
        finished before the first error is raised."""
        if not self._pipelined:
            return self._each(lambda i: finish(i, start(i)))
        started: list[_P] = []
        error: Exception | None = None
        for i in range(len(self.shards)):
            try:
                started.append(start(i))
            except Exception as exc:
                error = exc
                break
        results: list[_T] = []
        for i, pending in enumerate(started):
            try:
                results.append(finish(i, pending))
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    def _each(self, fn: Callable[[int], _T]) -> list[_T]:
        """fn(i) for every shard, concurrently (all but the last on this client's pool); the
        results in shard order. Every call ends before the first error is raised, so no
        transfer of this operation still runs when the caller retries it."""
        n = len(self.shards)
        if n <= 1:
            return [fn(i) for i in range(n)]
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(n - 1, thread_name_prefix="psclient")
        background = [self._pool.submit(fn, i) for i in range(n - 1)]
        error: BaseException | None = None
        results: list[_T] = []
        try:
            last = [fn(n - 1)]
        except Exception as exc:  # raised below, once the others are done
            error, last = exc, []
        for future in background:
            try:
                results.append(future.result())
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return [*results, *last]

    def preconditioners(self) -> list[torch.Tensor]:  # each shard's (optimizer.precondition_pushes)
        return self._each(lambda i: self._servers[i].rpc.preconditioner(self.job_id, self.shards[i]))

    # -- init ---------------------------------------------------------------------------

    def init(self, weights: torch.Tensor, config: ps_pb2.ShardConfig) -> None:
        """Creates every shard from the flat initial weights; config's per-shard fields are filled in."""
        _check_flat(weights, self.total)

        def one(i: int) -> ps_pb2.InitShardResponse:
            shard = self.shards[i]
            cfg = ps_pb2.ShardConfig()
            cfg.CopyFrom(config)
            cfg.job_id, cfg.shard_index = self.job_id, shard.index
            cfg.offset, cfg.length, cfg.total = shard.offset, shard.length, self.total
            part = weights[shard.offset : shard.offset + shard.length]
            return self._servers[i].rpc.init(cfg, part)

        self._each(one)
