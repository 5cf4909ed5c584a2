"""The fallback transport: Push and Pull as ps.proto's RPCs, with the generated stub and plain
protobuf messages, exactly what a client in any other language sends and reads. PSClient uses
it for servers without a data plane (`--data-port -1`, or a server from before it) and where
`data_plane=False`; the data plane (plane.py) is the fast path. It also makes the control
calls PSClient needs on every server: InitShard and GetDataPlane.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar, cast

import grpc
import torch

from shardps.proto import codec, common_pb2, dataplane, ps_pb2, ps_pb2_grpc
from shardps.psclient import deltas
from shardps.psclient.transport import PullWatch
from shardps.runtime import rpc

_Bulk = TypeVar("_Bulk", ps_pb2.PushRequest, ps_pb2.InitShardRequest)


class RpcTransport:
    """One server's ParameterServer service over one channel. Thread-safe, as the channel is."""

    def __init__(self, address: str, chunk_bytes: int):
        """`chunk_bytes` sizes the messages of the streams it sends (InitShard, Push)."""
        self.channel = rpc.make_channel(address)
        self._stub = ps_pb2_grpc.ParameterServerStub(self.channel)
        self._chunk_bytes = chunk_bytes

    def start_push(self, header: ps_pb2.PushHeader, part: torch.Tensor | bytes,
                   then_pull: ps_pb2.PullRequest | None = None) -> _RpcPush:
        """Starts the Push stream (gRPC's threads send it). Never sends `then_pull`: a Pull
        of its own would only hold a server thread waiting."""
        first = ps_pb2.PushRequest(header=header)
        messages = (_byte_stream(first, part, self._chunk_bytes) if isinstance(part, bytes)
                    else _stream(first, part, header.dtype, self._chunk_bytes))
        future = self._stub.Push.future(messages, timeout=rpc.TRANSFER_DEADLINE_S)
        return _RpcPush(future)

    def start_pull(self, request: ps_pb2.PullRequest) -> _RpcPull:
        stream = self._stub.Pull(request, timeout=request.timeout_ms / 1000 + rpc.TRANSFER_DEADLINE_S)
        return _RpcPull(request, stream)

    def init(self, config: ps_pb2.ShardConfig, weights: torch.Tensor) -> ps_pb2.InitShardResponse:
        """Creates the shard `config` describes from its fp32 initial weights."""
        first = ps_pb2.InitShardRequest(config=config, dtype=common_pb2.DTYPE_FLOAT32)
        messages = _stream(first, weights, common_pb2.DTYPE_FLOAT32, self._chunk_bytes)
        reply = self._stub.InitShard(messages, timeout=rpc.TRANSFER_DEADLINE_S)
        return cast(ps_pb2.InitShardResponse, reply)

    def preconditioner(self, job_id: str, shard: common_pb2.ShardRange) -> torch.Tensor:
        """A frozen shard's denominator D (fp32[shard.length]) for preconditioned pushes, read
        in chunks in offset order. Raises ValueError if the chunks do not cover the shard."""
        replies = self._stub.GetPreconditioner(
            ps_pb2.GetPreconditionerRequest(job_id=job_id, shard_index=shard.index,
                                            chunk_bytes=self._chunk_bytes),
            timeout=rpc.TRANSFER_DEADLINE_S)
        out = torch.empty(shard.length, dtype=torch.float32)
        filled = 0
        for reply in replies:
            n = len(reply.denominator) // 4
            if (reply.length_elements != shard.length or reply.offset_elements != filled
                    or len(reply.denominator) % 4 or filled + n > shard.length):
                raise ValueError(f"shard {shard.index}: preconditioner chunk of "
                                 f"{len(reply.denominator)} bytes at element "
                                 f"{reply.offset_elements} of {reply.length_elements}, expected "
                                 f"element {filled} of {shard.length}")
            out[filled : filled + n] = torch.frombuffer(bytearray(reply.denominator),
                                                        dtype=torch.float32)
            filled += n
        if filled != shard.length:
            raise ValueError(f"shard {shard.index}: preconditioner of {filled} elements, "
                             f"expected {shard.length}")
        return out

    def data_port(self) -> int:
        """The server's data port; 0 if it has none, speaks another protocol, or predates it."""
        try:
            reply = self._stub.GetDataPlane(ps_pb2.GetDataPlaneRequest(),
                                            timeout=rpc.CONTROL_DEADLINE_S)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # a server from before it
                raise
            return 0
        return int(reply.port) if reply.protocol == dataplane.PROTOCOL else 0

    def close(self) -> None:
        self.channel.close()


def _stream(first: _Bulk, flat: torch.Tensor, wire_dtype: int, chunk_bytes: int) -> Iterator[_Bulk]:
    """A bulk stream: `first` (the header or config) carrying the first chunk of `flat` in the
    wire dtype, then one message of its type per chunk (codec.chunk_elements elements each)."""
    step = codec.chunk_elements(wire_dtype, chunk_bytes)
    message = first
    for lo in range(0, flat.numel(), step):
        message.chunk.offset = lo
        message.chunk.data = codec.encode(flat[lo : lo + step], wire_dtype)
        yield message
        message = type(first)()
    if message is first:  # nothing to carry
        yield first


def _byte_stream(first: ps_pb2.PushRequest, data: bytes,
                 chunk_bytes: int) -> Iterator[ps_pb2.PushRequest]:
    """A compressed push's stream: its encoding in chunks of `chunk_bytes` (clamped as
    codec.chunk_elements clamps), each chunk's offset counting bytes."""
    step = codec.chunk_elements(common_pb2.DTYPE_FLOAT32, chunk_bytes) * 4
    message = first
    for lo in range(0, len(data), step):
        message.chunk.offset = lo
        message.chunk.data = data[lo : lo + step]
        yield message
        message = ps_pb2.PushRequest()
    if message is first:
        yield first


class _RpcPush:
    """A Push call in flight."""

    def __init__(self, future: grpc.Future):
        self._future = future

    def finish(self) -> tuple[ps_pb2.PushResponse, None]:
        return cast(ps_pb2.PushResponse, self._future.result()), None

    def cancel(self) -> None:
        self._future.cancel()


class _RpcPull:
    """A Pull call in flight; its messages are read by `finish` on the caller's thread."""

    def __init__(self, request: ps_pb2.PullRequest, stream: Iterator[ps_pb2.PullResponse]):
        self._request = request
        self._stream = stream

    @property
    def request(self) -> ps_pb2.PullRequest:
        return self._request

    def finish(self, dest: torch.Tensor, watch: PullWatch | None = None) -> ps_pb2.PullResponse:
        """`watch` is not told: the reply counts once it is read whole."""
        try:
            return self._drain(dest)
        finally:
            self.cancel()  # a no-op once finished; ends it on error

    def cancel(self) -> None:
        cast(grpc.Call, self._stream).cancel()

    def _drain(self, dest: torch.Tensor) -> ps_pb2.PullResponse:
        index = self._request.shard_index
        head = next(self._stream, None)
        if head is None:
            raise codec.CodecError(f"shard {index}: empty pull stream")
        if not head.ready:
            return head
        if head.length != dest.numel():
            raise codec.CodecError(f"shard {index}: server holds {head.length} elements, "
                                   f"map says {dest.numel()}")
        if head.delta_compression:  # a compressed pull: an encoding to add to dest
            delta = codec.ByteAssembler(deltas.delta_bytes(head))
            _add_chunks(delta, head, self._stream)
            deltas.apply_delta(dest, memoryview(delta.finish()))
            head.ClearField("chunk")
            return head
        target = codec.ChunkAssembler(dest, self._request.dtype)
        if head.HasField("chunk"):
            target.add(head.chunk)
        for reply in self._stream:
            if not reply.HasField("chunk"):
                raise codec.CodecError(f"shard {index}: a pull message without a chunk")
            target.add(reply.chunk)
        target.finish()
        head.ClearField("chunk")
        return head


def _add_chunks(target: codec.ByteAssembler, head: ps_pb2.PullResponse,
                rest: Iterator[ps_pb2.PullResponse]) -> None:
    if head.HasField("chunk"):
        target.add(head.chunk)
    for reply in rest:
        if not reply.HasField("chunk"):
            raise codec.CodecError("a pull message without a chunk")
        target.add(reply.chunk)
