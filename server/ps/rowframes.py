"""The row calls (InitRows, PullRows, PushRows) on the data plane: a request frame's body is
the RPC's request message and the reply's body its response, both handled by the same
RowService as the RPCs, so every check, status code and message is the RPC's
(proto/dataplane.py has the frame format; dataserver.py reads the frames)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError, Message

from shardps.proto import dataplane, ps_pb2

from .bulk import Refused
from .rowservice import RowService

# The request message of each kind, and its name in refusals.
REQUESTS: dict[int, tuple[type[Message], str]] = {
    dataplane.INIT_ROWS: (ps_pb2.InitRowsRequest, "InitRows"),
    dataplane.PULL_ROWS: (ps_pb2.PullRowsRequest, "PullRows"),
    dataplane.PUSH_ROWS: (ps_pb2.PushRowsRequest, "PushRows"),
}


def answer(rows: RowService, kind: int, body: bytes, is_active: Callable[[], bool]) -> bytes:
    """The reply frame to one row request frame (`kind` in dataplane.ROW_KINDS): the
    response, or the refusal's code and message. Never raises for what the client sent; the
    frame was read whole, so the connection stays in step either way."""
    message_type, name = REQUESTS[kind]
    try:
        request = message_type.FromString(body)
    except DecodeError:
        return error_frame(grpc.StatusCode.INVALID_ARGUMENT, f"{name} request does not parse")
    try:
        reply: Message
        if isinstance(request, ps_pb2.InitRowsRequest):
            reply = rows.init_rows(request)
        elif isinstance(request, ps_pb2.PullRowsRequest):
            reply = rows.pull_rows(request, is_active)
        else:
            assert isinstance(request, ps_pb2.PushRowsRequest)
            reply = rows.push_rows(request)
    except Refused as exc:
        return error_frame(exc.code, str(exc))
    return dataplane.frame(0, reply.SerializeToString())


def error_frame(code: grpc.StatusCode, message: str) -> bytes:
    """A refusal's reply frame: the status code's number and the UTF-8 message."""
    return dataplane.frame(code.value[0], message.encode()[: dataplane.MAX_BODY_BYTES])
