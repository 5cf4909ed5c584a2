"""gRPC channel and server factories, TLS, tokens, health service and deadlines, in one place.

Every daemon and client builds its channels and servers here, so message limits, keepalive,
TLS and the shared-token check are the same everywhere. A process sets its security once at
start (`configure`); every channel and server it makes afterwards uses it.

Servers also guard every call (runtime/callguard.py: limits on every wait on a client,
INVALID_ARGUMENT for request bytes that do not parse), a call refused for the token reads
nothing, and streaming calls and health checks run on thread pools of their own, so that
control calls always find a thread.
"""

from __future__ import annotations

import hmac
import os
import sys
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardps.runtime import callguard

# Chunks are at most 16 MiB; leave room for headers.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

# Default deadlines (seconds) for RPCs that return quickly; streaming transfers get their own.
CONTROL_DEADLINE_S = 10.0
TRANSFER_DEADLINE_S = 300.0
HEALTH_WORKERS = 4  # threads for health checks, apart from everything else

COORDINATOR_ENV = "SHARDPS_COORDINATOR"
DEFAULT_COORDINATOR = "127.0.0.1:7070"

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # A peer that restarts (a server on its data dir, the coordinator on its state dir) is
    # found again within 2 s, not after gRPC's default reconnect backoff of up to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Clients ping idle channels (keepalive_permit_without_calls above); a server that does
    # not permit that counts each such ping as a strike and, after two, closes the channel
    # with GOAWAY too_many_pings, so an idle worker's next call found it gone.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),  # port 0 must give a port nobody else holds
    # A connection that has not finished its TLS (or HTTP/2) handshake by then is closed.
    ("grpc.server_handshake_timeout_ms", 10_000),
]


def default_coordinator() -> str:
    """The coordinator address from $SHARDPS_COORDINATOR, else 127.0.0.1:7070."""
    return os.environ.get(COORDINATOR_ENV) or DEFAULT_COORDINATOR


@dataclass(frozen=True)
class Security:
    """TLS material (PEM bytes) and the shared token of this process; all optional.

    A server with cert + key serves TLS, and with a CA too it requires client certificates
    signed by it (mutual TLS). A client with a CA verifies servers against it, and with cert +
    key presents its own certificate. A token is sent with, and required on, every RPC but
    the health checks.
    """

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    token: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.ca or (self.cert and self.key))


_security = Security()

AUTH_HEADER = "authorization"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED_MESSAGE = "missing or wrong shardps token"


def configure(security: Security) -> None:
    """Sets the security every later channel and server of this process uses."""
    global _security
    if bool(security.cert) != bool(security.key):
        raise ValueError("a TLS certificate needs its key and a key its certificate")
    _security = security


def current_security() -> Security:
    return _security


def make_channel(address: str, extra_options: Sequence[tuple[str, int | str]] = ()) -> grpc.Channel:
    """A channel with shardps's message limits, keepalive, and the process's TLS and token;
    `extra_options` are added to those and replace any of the same name (gRPC would keep the
    first of two)."""
    sec = _security
    options = list({**dict(_OPTIONS), **dict(extra_options)}.items())
    if sec.tls:
        creds = grpc.ssl_channel_credentials(root_certificates=sec.ca, private_key=sec.key,
                                             certificate_chain=sec.cert)
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if sec.token:
        channel = grpc.intercept_channel(channel, _TokenSender(sec.token))
    return channel


def make_server(max_workers: int = 16, stream_workers: int | None = None) -> grpc.Server:
    """A thread-pool gRPC server with shardps's message limits, the guard on every call (see
    the module docstring) and, when the process has a token, the token check on every RPC
    but health (not yet bound or started).

    `max_workers` threads serve unary calls; streaming calls get `stream_workers` threads of
    their own (default as many; 0: they share the unary calls' threads), so that streams
    that hold their threads long (waiting pulls, slow pushes) never take a control call's;
    health checks get HEALTH_WORKERS. Threads start as calls need them.
    """
    if stream_workers is None:
        stream_workers = max_workers
    streams = (futures.ThreadPoolExecutor(max_workers=stream_workers, thread_name_prefix="grpc-stream")
               if stream_workers > 0 else None)
    health_pool = futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS, thread_name_prefix="grpc-health")
    interceptors: list[grpc.ServerInterceptor] = [_TokenCheck(_security.token)] if _security.token else []
    interceptors.append(callguard.CallGuard(
        lambda method, handler: health_pool if method.startswith(HEALTH_PREFIX) else (
            streams if handler.request_streaming or handler.response_streaming else None),
        total_wait_s=TRANSFER_DEADLINE_S))
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=_SERVER_OPTIONS,
        maximum_concurrent_rpcs=max(max_workers, stream_workers) * 4,
        interceptors=interceptors,
    )


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class _TokenSender(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` to every call of a channel."""

    def __init__(self, token: str):
        self._header = (AUTH_HEADER, f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, (*(details.metadata or ()), self._header))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every RPC but health checks without the shared token.

    The refusal happens before the handler runs, so a refused call changes no state.
    """

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        if details.method.startswith(HEALTH_PREFIX):
            return continuation(details)
        sent = dict(details.invocation_metadata or ()).get(AUTH_HEADER, "")
        if hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        # As streaming-request handlers, so that gRPC runs them without waiting for (or
        # reading) a request: a refused call never holds a thread.
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny)
        return grpc.stream_unary_rpc_method_handler(_deny)


def _deny(request_iterator: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def bind(server: grpc.Server, host: str, port: int) -> int:
    """Binds host:port (0 picks a free port) and returns the bound port.

    Raises OSError when the address cannot be bound.
    """
    address = f"{_bracket(host)}:{port}"
    sec = _security
    try:
        if sec.cert and sec.key:
            creds = grpc.ssl_server_credentials([(sec.key, sec.cert)], root_certificates=sec.ca,
                                                require_client_auth=sec.ca is not None)
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind {host}:{port}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return bound


def add_health(server: grpc.Server, *services: str) -> health.HealthServicer:
    """Registers grpc.health.v1 on the server with every named service SERVING."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def announce(host: str, port: int) -> None:
    """Prints the one readiness line every daemon prints, and flushes it.

    One write of the whole line (print writes the text and the newline apart, which unbuffered
    stdout passes on as two writes): a log line from another thread on the same pipe can then
    never land inside it."""
    sys.stdout.write(f"listening on {_bracket(host)}:{port}\n")
    sys.stdout.flush()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def fail(message: str, code: int) -> None:
    """Prints a one-line error to stderr and exits with a code from exitcodes."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
