"""What every shardps daemon shares: flags, logging, the metrics endpoint and signals."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from shardps.proto import rpc

LOG_FORMAT = "%(asctime)s %(levelname)s %(node)s%(job_suffix)s %(name)s: %(message)s"

# Who is logging: the process's role and node id (set once registered), and per thread the
# job it works on, so that every line, text or JSON, says which node and job it is about.
_log_context = {"role": "", "node": ""}
_thread_context = threading.local()


def add_common_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Adds --host, --port, --metrics-port and --log-level to a daemon's parser."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default_port,
                        help=f"gRPC port; 0 picks a free one (default {default_port})")
    parser.add_argument("--metrics-port", type=int, default=-1,
                        help="Prometheus /metrics port; 0 picks a free one; -1 (default) disables")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text lines, or one JSON object per line (default text)")
    add_security_args(parser)


TOKEN_ENV = "SHARDPS_TOKEN"  # the shared token itself (for containers); prefer --token-file


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """Adds --tls-cert, --tls-key, --tls-ca and --token-file (each also from an env var)."""
    env = os.environ.get
    parser.add_argument("--tls-cert", default=env("SHARDPS_TLS_CERT"), metavar="PEM",
                        help="this process's certificate (serve TLS; present it to peers); $SHARDPS_TLS_CERT")
    parser.add_argument("--tls-key", default=env("SHARDPS_TLS_KEY"), metavar="PEM",
                        help="its private key; $SHARDPS_TLS_KEY")
    parser.add_argument("--tls-ca", default=env("SHARDPS_TLS_CA"), metavar="PEM",
                        help="CA that peers' certificates must be signed by (with --tls-cert on a "
                             "daemon: mutual TLS); $SHARDPS_TLS_CA")
    parser.add_argument("--token-file", default=env("SHARDPS_TOKEN_FILE"), metavar="PATH",
                        help=f"file holding the shared token required on every RPC; "
                             f"$SHARDPS_TOKEN_FILE, or the token itself in ${TOKEN_ENV}")


def configure_security(args: argparse.Namespace) -> rpc.Security:
    """Reads the files named by the security flags and configures every later channel/server.

    Raises ValueError naming the flag when a file cannot be read or the set is incomplete.
    """
    def read(flag: str, path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None

    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        raw = read("--token-file", args.token_file)
        token = raw.decode().strip() if raw else None
        if not token:
            raise ValueError(f"--token-file: {args.token_file} is empty")
    security = rpc.Security(cert=read("--tls-cert", args.tls_cert), key=read("--tls-key", args.tls_key),
                            ca=read("--tls-ca", args.tls_ca), token=token)
    if bool(security.cert) != bool(security.key):
        raise ValueError("--tls-cert and --tls-key go together")
    rpc.configure(security)
    return security


def add_coordinator_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", default=rpc.default_coordinator(),
                        help=f"coordinator host:port (default ${rpc.COORDINATOR_ENV} "
                             f"or {rpc.DEFAULT_COORDINATOR})")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _log_context["role"]
        record.node = _log_context["node"] or _log_context["role"]
        job = getattr(record, "job", "") or getattr(_thread_context, "job", "")
        record.job = job
        record.job_suffix = f" [{job}]" if job else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, role, node, job, logger, msg (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname, "role": getattr(record, "role", ""),
            "node": getattr(record, "node", ""), "job": getattr(record, "job", ""),
            "logger": record.name, "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(level: str, fmt: str = "text", role: str = "") -> None:
    """Logs to stderr in the chosen format, each line tagged with role, node and job."""
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    _log_context["role"] = role


def set_log_node(node_id: str) -> None:
    """Tags every later log line of this process with its node id."""
    _log_context["node"] = node_id


@contextmanager
def job_log_context(job_id: str) -> Iterator[None]:
    """Tags the calling thread's log lines with a job id while the block runs."""
    previous = getattr(_thread_context, "job", "")
    _thread_context.job = job_id
    try:
        yield
    finally:
        _thread_context.job = previous


def new_registry() -> CollectorRegistry:
    """A metrics registry of one daemon, with process, platform and GC collectors."""
    disable_created_metrics()  # *_created series only double what a scrape needs to store
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


Route = Callable[[], tuple[str, bytes]]  # () -> (content type, body)


class MetricsEndpoint:
    """Serves a registry at http://host:port/metrics (plus extra GET routes) from daemon threads.

    `routes` maps a path to a function returning (content type, body); the coordinator serves
    its Prometheus service-discovery list this way. Thread-safe: each request runs on its own
    thread, so routes must do their own locking.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 routes: dict[str, Route] | None = None):
        handlers: dict[str, Route] = {"/metrics": lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))}
        handlers.update(routes or {})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                route = handlers.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404, "not found: try /metrics")
                    return
                content_type, body = route()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # scrapes are not events
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.host = host
        self.port = self._httpd.server_address[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def start_metrics(registry: CollectorRegistry, host: str, port: int,
                  routes: dict[str, Route] | None = None) -> MetricsEndpoint | None:
    """Starts the endpoint unless port is negative; prints `metrics on HOST:PORT`.

    Raises OSError if the port cannot be bound.
    """
    if port < 0:
        return None
    endpoint = MetricsEndpoint(registry, host, port, routes)
    print(f"metrics on {endpoint.address}", flush=True)
    return endpoint


def run_until_signal(stop: Callable[[], None], wait: Callable[[float], bool],
                     ready: Callable[[], None] = lambda: None) -> None:
    """Installs SIGTERM/SIGINT handlers, calls ready() (which announces the daemon), then
    blocks until a signal (or until `wait` returns True) and calls stop().

    Announcing only after the handlers are in place means a supervisor that signals as soon
    as it reads `listening on` always gets a clean shutdown. `wait(timeout)` should return
    True when the daemon has ended on its own.
    """
    stopping = threading.Event()

    def handler(signum, frame):
        logging.getLogger("shardps").info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    ready()
    while not stopping.is_set():
        if wait(0.5):
            break
    stop()
