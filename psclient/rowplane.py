"""How RowClient reaches one server: its data plane when it has one (the row frames of
proto/dataplane.py), else the InitRows, PullRows and PushRows RPCs, which mean exactly the
same. A call is started (its request sent) and finished (its reply read) separately, so that
RowClient sends to every shard before it reads any reply. Errors are grpc.RpcErrors on both
paths (DataPlaneError on the data plane)."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from shardps.proto import codec, dataplane, ps_pb2_grpc
from shardps.psclient.connection import Connection
from shardps.psclient.plane import DataPlaneTransport
from shardps.psclient.rpcpath import RpcTransport

_M = TypeVar("_M", bound=Message)
_M_co = TypeVar("_M_co", bound=Message, covariant=True)

# The frame kind of each row RPC.
KINDS = {"InitRows": dataplane.INIT_ROWS, "PullRows": dataplane.PULL_ROWS,
         "PushRows": dataplane.PUSH_ROWS}


class PendingRows(Protocol[_M_co]):
    """A row call whose request is sent; `result` reads its reply (once). Owned by one thread."""

    def result(self) -> _M_co: ...


class RowServer:
    """One server's row calls: its data plane if it has one and `data_plane` is on, else its
    RPCs. Thread-safe, as the transports are."""

    def __init__(self, address: str, data_plane: bool):
        self.rpc = RpcTransport(address, codec.DEFAULT_CHUNK_BYTES)  # GetDataPlane, the channel
        self.stub = ps_pb2_grpc.ParameterServerStub(self.rpc.channel)
        self.plane = DataPlaneTransport(address, self.rpc.data_port) if data_plane else None

    def start(self, method: str, request: Message, reply_type: type[_M],
              timeout: float) -> PendingRows[_M]:
        """Sends `request` for the RPC `method` ("PullRows", ...); the reply within `timeout` s."""
        if self.plane is not None and self.plane.available():
            return _PlaneCall.start(self.plane, KINDS[method], request, reply_type, timeout)
        return _RpcCall(getattr(self.stub, method).future(request, timeout=timeout))

    def close(self) -> None:
        if self.plane is not None:
            self.plane.close()
        self.rpc.close()


class _RpcCall(Generic[_M]):
    """A row RPC in flight (gRPC's future)."""

    def __init__(self, future: grpc.Future):
        self._future = future

    def result(self) -> _M:
        reply: _M = self._future.result()
        return reply


class _PlaneCall(Generic[_M]):
    """A row call on a checked-out data-plane connection, handed back when its reply is read."""

    def __init__(self, plane: DataPlaneTransport, conn: Connection, reply_type: type[_M],
                 timeout: float):
        self._plane, self._conn, self._type, self._timeout = plane, conn, reply_type, timeout

    @classmethod
    def start(cls, plane: DataPlaneTransport, kind: int, request: Message, reply_type: type[_M],
              timeout: float) -> _PlaneCall[_M]:
        body = request.SerializeToString()
        if len(body) > dataplane.MAX_ROWS_BODY_BYTES:  # as gRPC refuses to send it
            raise dataplane.DataPlaneError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a request of {len(body)} bytes (at most {dataplane.MAX_ROWS_BODY_BYTES})")
        conn = plane.checkout()
        try:
            conn.start_request(kind, body, timeout)
        except BaseException:
            plane.failed(conn)
            raise
        return cls(plane, conn, reply_type, timeout)

    def result(self) -> _M:
        try:
            body = self._conn.finish_request(self._timeout, dataplane.MAX_ROWS_BODY_BYTES)
            reply = self._type.FromString(body)
        except DecodeError:
            self._plane.failed(self._conn)
            raise dataplane.DataPlaneError(grpc.StatusCode.INTERNAL, f"data plane "
                                           f"{self._conn.address}: a reply that does not parse") from None
        except BaseException:
            self._plane.failed(self._conn)
            raise
        self._plane.give_back(self._conn)
        return reply
