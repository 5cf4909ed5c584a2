"""gRPC channel and server factories, health service and deadlines, in one place.

Every daemon and client builds its channels and servers here, so message limits, keepalive
and (later) TLS settings are the same everywhere.
"""

from __future__ import annotations

import os
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# Chunks are at most 16 MiB; leave room for headers.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

# Default deadlines (seconds) for RPCs that return quickly; streaming transfers get their own.
CONTROL_DEADLINE_S = 10.0
TRANSFER_DEADLINE_S = 300.0

COORDINATOR_ENV = "SHARDPS_COORDINATOR"
DEFAULT_COORDINATOR = "127.0.0.1:7070"

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
_SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),  # port 0 must give a port nobody else holds
]


def default_coordinator() -> str:
    """The coordinator address from $SHARDPS_COORDINATOR, else 127.0.0.1:7070."""
    return os.environ.get(COORDINATOR_ENV) or DEFAULT_COORDINATOR


def make_channel(address: str) -> grpc.Channel:
    """An insecure channel with shardps's message limits and keepalive."""
    return grpc.insecure_channel(address, options=_OPTIONS)


def make_server(max_workers: int = 16) -> grpc.Server:
    """A thread-pool gRPC server with shardps's message limits (not yet bound or started)."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=_SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_workers * 4,
    )


def bind(server: grpc.Server, host: str, port: int) -> int:
    """Binds host:port (0 picks a free port) and returns the bound port.

    Raises OSError when the address cannot be bound.
    """
    try:
        bound = server.add_insecure_port(f"{_bracket(host)}:{port}")
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
    """Prints the one readiness line every daemon prints, and flushes it."""
    print(f"listening on {_bracket(host)}:{port}", flush=True)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def fail(message: str, code: int) -> None:
    """Prints a one-line error to stderr and exits with a code from exitcodes."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
