"""What every shardps daemon shares: flags, logging, the metrics endpoint and signals."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

from shardps.proto import rpc

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_common_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Adds --host, --port, --metrics-port and --log-level to a daemon's parser."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default_port,
                        help=f"gRPC port; 0 picks a free one (default {default_port})")
    parser.add_argument("--metrics-port", type=int, default=-1,
                        help="Prometheus /metrics port; 0 picks a free one; -1 (default) disables")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def add_coordinator_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", default=rpc.default_coordinator(),
                        help=f"coordinator host:port (default ${rpc.COORDINATOR_ENV} "
                             f"or {rpc.DEFAULT_COORDINATOR})")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format=LOG_FORMAT)


def new_registry() -> CollectorRegistry:
    """A metrics registry of one daemon, with process, platform and GC collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """Serves a registry at http://host:port/metrics from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = self._httpd.server_port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def start_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint | None:
    """Starts the endpoint unless port is negative; prints `metrics on HOST:PORT`."""
    if port < 0:
        return None
    endpoint = MetricsEndpoint(registry, host, port)
    print(f"metrics on {endpoint.address}", flush=True)
    return endpoint


def run_until_signal(stop: Callable[[], None], wait: Callable[[float], bool]) -> None:
    """Blocks until SIGTERM/SIGINT (or until `wait` returns True), then calls stop().

    `wait(timeout)` should return True when the daemon has ended on its own.
    """
    stopping = threading.Event()

    def handler(signum, frame):
        logging.getLogger("shardps").info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stopping.is_set():
        if wait(0.5):
            break
    stop()
