"""What every shardps daemon shares: flags, logging, the metrics endpoint and signals."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

from shardps.runtime import gate, rpc

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

HTTP_DEADLINE_S = 10.0    # a scrape's request head in, and its answer out, from the accept
HTTP_MAX_PENDING = 64     # connections being read or answered (see runtime/gate.py)
HTTP_MAX_HEAD = 8192      # bytes of request line and headers
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}
_metrics_log = logging.getLogger("shardps.metrics")


class MetricsEndpoint:
    """Serves a registry at http://host:port/metrics (plus extra GET routes).

    `routes` maps a path to a function returning (content type, body); the coordinator serves
    its Prometheus service-discovery list this way. Unauthenticated plain HTTP, so it costs a
    client no thread: one thread (runtime/gate.py) reads every request head and writes every
    answer without blocking, under one deadline per connection (HTTP_DEADLINE_S), at most
    HTTP_MAX_PENDING connections at a time; routes run on that thread, one at a time.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 routes: dict[str, Route] | None = None):
        self._routes: dict[str, Route] = {"/metrics": lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))}
        self._routes.update(routes or {})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        self.host = host
        self.port = listener.getsockname()[1]
        self._gate = gate.Gate(listener, self._answer, name="metrics", deadline_s=HTTP_DEADLINE_S,
                               max_pending=HTTP_MAX_PENDING)
        self._gate.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def shutdown(self) -> None:
        self._gate.stop()

    def _answer(self, data: bytes) -> int | gate.Reply:
        """The request head read so far -> more to read, or the answer."""
        end = data.find(b"\n\r\n")
        if end < 0:
            end = data.find(b"\n\n")
        if end < 0:
            if len(data) >= HTTP_MAX_HEAD:
                return gate.Reply(_http(431, b"request head too large\n"))
            return HTTP_MAX_HEAD - len(data)
        words = data[: data.find(b"\n")].decode("latin-1").split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            return gate.Reply(_http(400, b"bad request line\n"))
        method, target = words[0], words[1]
        if method not in ("GET", "HEAD"):
            return gate.Reply(_http(405, b"only GET\n"))
        route = self._routes.get(target.split("?", 1)[0])
        if route is None:
            return gate.Reply(_http(404, b"not found: try /metrics\n"))
        try:
            content_type, body = route()
        except Exception:
            _metrics_log.exception("metrics: %s failed", target)
            return gate.Reply(_http(500, b"internal error\n"))
        return gate.Reply(_http(200, body, content_type, head_only=method == "HEAD"))


def _http(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
          head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + (b"" if head_only else body)


def start_metrics(registry: CollectorRegistry, host: str, port: int,
                  routes: dict[str, Route] | None = None) -> MetricsEndpoint | None:
    """Starts the endpoint unless port is negative; prints `metrics on HOST:PORT`.

    Raises OSError if the port cannot be bound.
    """
    if port < 0:
        return None
    endpoint = MetricsEndpoint(registry, host, port, routes)
    sys.stdout.write(f"metrics on {endpoint.address}\n")  # one write, as rpc.announce does
    sys.stdout.flush()
    return endpoint


def run_until_signal(stop: Callable[[], None], wait: Callable[[float], bool],
                     ready: Callable[[], None] = lambda: None) -> None:
    """Installs SIGTERM/SIGINT handlers, calls ready() (which announces the daemon), then
    blocks until a signal (or until `wait` returns True) and calls stop().

    Announcing only after the handlers are in place means a supervisor that signals as soon
    as it reads `listening on` always gets a clean shutdown. `wait(timeout)` should return
    True when the daemon has ended on its own. Before announcing, it freezes the objects
    start-up made (gc.freeze), so that no collection walks them again.
    """
    stopping = threading.Event()

    def handler(signum, frame):
        logging.getLogger("shardps").info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    # What imports and start-up made lives as long as the process: torch alone is some
    # hundreds of thousands of objects. Frozen, the cycle collector no longer walks them in
    # each full collection, nor in the interpreter's at exit (about a second of CPU for a
    # daemon started as a console script; a forked one ends with os._exit and skips it).
    gc.freeze()
    ready()
    while not stopping.is_set():
        if wait(0.5):
            break
    stop()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
