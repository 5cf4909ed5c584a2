"""How PSClient moves one shard's bulk data to and from one server: the `Transport` interface,
and the pending push and pull it hands back between sending a request and reading its reply.

Two implementations, same meaning: the server's data plane (plane.py, the fast path) and the
Push and Pull RPCs of ps.proto (rpcpath.py, the fallback for servers without a data plane).
Sending and reading are separate so that PSClient can send to every server before it reads
any reply. Errors are grpc.RpcErrors (DataPlaneError on the data plane), or codec.CodecError
for a reply whose chunks do not fit.
"""

from __future__ import annotations

from typing import Protocol

import torch

from shardps.proto import ps_pb2


class PullWatch(Protocol):
    """Told of a pull's progress as its reply arrives (an overlapped pull, psclient/inflight.py),
    on the thread that reads it. A transport that cannot tell calls neither."""

    def head(self, head: ps_pb2.PullResponse) -> None:
        """The reply's head has been read (its elements, if ready, follow)."""
        ...

    def received(self, elements: int) -> None:
        """The first `elements` elements of dest have landed."""
        ...


class PendingPull(Protocol):
    """A pull whose request is sent and whose reply is not yet read. Owned by one thread;
    exactly one of `finish` and `cancel` is called."""

    @property
    def request(self) -> ps_pb2.PullRequest: ...

    def finish(self, dest: torch.Tensor, watch: PullWatch | None = None) -> ps_pb2.PullResponse:
        """Reads the reply: its head (ready, version, job_done); a ready reply's elements land
        in `dest` (flat, CPU, the shard's length, fp32 or the wire dtype). `watch`, where
        the transport can tell, hears of the head and of the elements as they land."""
        ...

    def cancel(self) -> None:
        """Abandons the reply (the call is ended, a connection out of step is closed)."""
        ...


class PendingPush(Protocol):
    """A push whose gradient is sent and whose reply is not yet read. Owned by one thread;
    exactly one of `finish` and `cancel` is called."""

    def finish(self) -> tuple[ps_pb2.PushResponse, PendingPull | None]:
        """Reads the reply; and the pull sent right behind the push, if the transport sent
        one (the caller then owns it)."""
        ...

    def cancel(self) -> None:
        """Abandons the reply (and any pull sent behind the push)."""
        ...


class Transport(Protocol):
    """One server's bulk path. Thread-safe: several threads may have calls pending at once."""

    def start_push(self, header: ps_pb2.PushHeader, part: torch.Tensor | bytes,
                   then_pull: ps_pb2.PullRequest | None = None) -> PendingPush:
        """Sends `part` (flat, CPU) in the wire dtype `header.dtype`, or, for a compressed
        push (header.compression), its encoding as bytes; `then_pull` asks for that pull to
        be sent right behind it where the transport can keep the two in order."""
        ...

    def start_pull(self, request: ps_pb2.PullRequest) -> PendingPull:
        """Sends a pull request."""
        ...
