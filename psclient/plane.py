"""The fast transport: a server's data plane (raw frames over TCP, proto/dataplane.py), sent
from and received straight into the caller's tensors, over connections kept between calls."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import torch

from shardps.proto import dataplane, ps_pb2
from shardps.psclient.connection import Connection
from shardps.psclient.shmlink import Lengths
from shardps.psclient.transport import PullWatch
from shardps.runtime import rpc, sslcontext


class DataPlaneTransport:
    """One server's data plane. Its port is asked for (`ask_port`, the GetDataPlane RPC) on
    first use and again after a connection to it fails (a restarted server listens
    elsewhere); `available` says whether the server has one.

    Thread-safety: a lock guards the port and the idle connections; a connection is checked
    out by one pending call at a time (its thread's), and goes back idle when its reply is
    read, or is closed.
    """

    def __init__(self, address: str, ask_port: Callable[[], int]):
        self._host = address.rsplit(":", 1)[0].strip("[]")
        self._ask_port = ask_port
        self._port: int | None = None
        self._idle: list[Connection] = []
        self._lengths: Lengths = {}  # its connections' shard lengths (psclient/shmlink.py)
        self._lock = threading.Lock()
        security = rpc.current_security()
        self._tls = sslcontext.client_context(security)
        self._token = security.token

    def available(self) -> bool:
        """Whether the server has a data plane (asks for its port if not known)."""
        with self._lock:
            port = self._port
        if port is None:
            port = self._ask_port()
            with self._lock:
                self._port = port
        return port != 0

    def start_push(self, header: ps_pb2.PushHeader, part: torch.Tensor | bytes,
                   then_pull: ps_pb2.PullRequest | None = None) -> _PlanePush:
        """Sends the push, and `then_pull` right behind it on the same connection (the server
        answers it once the push is handled)."""
        conn = self._connection()
        try:
            conn.start_push(header, part, header.dtype, rpc.TRANSFER_DEADLINE_S)
            if then_pull is not None:
                conn.start_pull(then_pull, rpc.TRANSFER_DEADLINE_S, behind=True)
        except BaseException:
            self.failed(conn)
            raise
        return _PlanePush(self, conn, then_pull)

    def start_pull(self, request: ps_pb2.PullRequest) -> _PlanePull:
        conn = self._connection()
        try:
            conn.start_pull(request, _pull_deadline(request))
        except BaseException:
            self.failed(conn)
            raise
        return _PlanePull(self, conn, request)

    def start_pieces(self, header: ps_pb2.PushHeader,
                     then_pull: ps_pb2.PullRequest | None = None) -> PlanePieces:
        """Sends an overlapped push's header (header.pieces > 0); its pieces follow on the
        same connection, sent through the returned PlanePieces."""
        conn = self._connection()
        try:
            conn.start_pieces(header, rpc.TRANSFER_DEADLINE_S)
        except BaseException:
            self.failed(conn)
            raise
        return PlanePieces(self, conn, header.dtype, then_pull)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def checkout(self) -> Connection:
        """A connection for one call of the caller's own (rowplane.py): it hands it back with
        `give_back` once the reply is read, or `failed` if the call raised."""
        return self._connection()

    def _connection(self) -> Connection:
        """An idle connection that is still usable, or a new one."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.usable():
                    return conn
            port = self._port
        if port is None and self.available():  # forgotten by another thread's failure
            port = self._port
        if not port:
            raise dataplane.DataPlaneError(grpc.StatusCode.UNAVAILABLE,
                                           f"data plane {self._host}: no data port any more")
        try:
            return Connection(self._host, port, self._tls, self._token, self._lengths)
        except dataplane.DataPlaneError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._forget_port()
            raise

    def give_back(self, conn: Connection) -> None:
        """A connection whose call is done goes back idle (its pending calls call this)."""
        with self._lock:
            self._idle.append(conn)

    def failed(self, conn: Connection) -> None:
        """A call on `conn` raised: it is closed (out of step, or already closed by the
        failure), and the port asked for again next time (cheap, and a restart moves it)."""
        conn.close()
        self._forget_port()

    def _forget_port(self) -> None:
        with self._lock:
            if self._port:
                self._port = None


def _pull_deadline(request: ps_pb2.PullRequest) -> float:
    return request.timeout_ms / 1000 + rpc.TRANSFER_DEADLINE_S


class _PlanePush:
    """A push sent on a checked-out connection, maybe with a pull sent behind it."""

    def __init__(self, plane: DataPlaneTransport, conn: Connection,
                 then_pull: ps_pb2.PullRequest | None):
        self._plane, self._conn, self._then_pull = plane, conn, then_pull

    def finish(self) -> tuple[ps_pb2.PushResponse, _PlanePull | None]:
        try:
            reply = self._conn.finish_push(rpc.TRANSFER_DEADLINE_S)
        except BaseException:
            self._plane.failed(self._conn)
            raise
        if self._then_pull is None:
            self._plane.give_back(self._conn)
            return reply, None
        return reply, _PlanePull(self._plane, self._conn, self._then_pull)  # it keeps conn

    def cancel(self) -> None:
        self._conn.close()  # replies are still on their way: out of step


class _PlanePull:
    """A pull sent on a checked-out connection; `finish` reads its reply and gives it back."""

    def __init__(self, plane: DataPlaneTransport, conn: Connection, request: ps_pb2.PullRequest):
        self._plane, self._conn, self._request = plane, conn, request

    @property
    def request(self) -> ps_pb2.PullRequest:
        return self._request

    def finish(self, dest: torch.Tensor, watch: PullWatch | None = None) -> ps_pb2.PullResponse:
        try:
            head = self._conn.finish_pull(self._request, dest, _pull_deadline(self._request),
                                          watch)
        except BaseException:
            self._plane.failed(self._conn)
            raise
        self._plane.give_back(self._conn)
        return head

    def cancel(self) -> None:
        self._conn.close()  # its answer is still on its way: out of step


class PlanePieces:
    """An overlapped push on a checked-out connection: `send` each piece (one thread at a
    time), then `finish`, which sends `then_pull` behind the last piece and reads the reply;
    or `cancel`."""

    def __init__(self, plane: DataPlaneTransport, conn: Connection, wire_dtype: int,
                 then_pull: ps_pb2.PullRequest | None):
        self._plane, self._conn, self._dtype, self._then_pull = plane, conn, wire_dtype, then_pull

    def send(self, offset: int, part: torch.Tensor) -> None:
        """Sends `part` (CPU, contiguous) as the piece at `offset` elements into the shard."""
        try:
            self._conn.send_piece(offset, part, self._dtype, rpc.TRANSFER_DEADLINE_S)
        except BaseException:
            self._plane.failed(self._conn)
            raise

    def finish(self) -> tuple[ps_pb2.PushResponse, _PlanePull | None]:
        if self._then_pull is not None:
            try:
                self._conn.start_pull(self._then_pull, rpc.TRANSFER_DEADLINE_S, behind=True)
            except BaseException:
                self._plane.failed(self._conn)
                raise
        return _PlanePush(self._plane, self._conn, self._then_pull).finish()

    def cancel(self) -> None:
        self._conn.close()  # pieces or the reply still owed: out of step
