"""The coordinator daemon (`shardps-coordinator`): gRPC server, health, metrics, lease sweeper."""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading

import grpc
from grpc_health.v1 import health

from shardps.proto import coordinator_pb2_grpc, exitcodes
from shardps.runtime import daemon, rpc

from .longpoll import MAX_HELD_CALLS
from .servicer import CoordinatorServicer
from .state import StateError

SERVICE_NAME = "shardps.v1.Coordinator"
# gRPC pool threads for ordinary calls; held long-polls get threads of their own on top.
RPC_THREADS = 16

log = logging.getLogger(__name__)


class CoordinatorDaemon:
    """A coordinator serving on host:port (0 picks a free port).

    Owns its gRPC server, its metrics endpoint and a sweeper thread that expires leases every
    lease_ms / 4 even when no RPC arrives. `start`, `stop` and `wait` are meant for one
    controlling thread.

    Args:
        host: address to bind.
        port: gRPC port; 0 picks a free one (read it back from `port` / `address`).
        lease_ms: the lease handed to nodes.
        metrics_port: Prometheus port; 0 picks a free one, negative disables.
        state_dir: where the node and job tables persist (restored from it on start); None
            keeps them in memory only.
        max_held_calls: long-polls (idle workers' heartbeats, GetJob waits) held at once;
            the gRPC pool has RPC_THREADS threads more than this, so held calls never starve
            the others. Beyond it, calls are answered at once.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, lease_ms: int = 5000,
                 metrics_port: int = -1, state_dir: str | None = None,
                 max_held_calls: int = MAX_HELD_CALLS):
        self.host = host
        self.port = port
        self.registry = daemon.new_registry()
        # Raises StateError if state_dir holds a state that cannot be loaded.
        self.servicer = CoordinatorServicer(lease_ms, registry=self.registry,
                                            state_dir=state_dir, max_held_calls=max_held_calls,
                                            sweep_period_s=lease_ms / 4000.0)
        self._threads = RPC_THREADS + max_held_calls
        self.metrics: daemon.MetricsEndpoint | None = None
        self._metrics_port = metrics_port
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None

    @property
    def address(self) -> str:
        """host:port actually bound (valid after start)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        """host:port of the metrics endpoint, "" when disabled."""
        return self.metrics.address if self.metrics else ""

    def _scrape_targets(self) -> tuple[str, bytes]:
        """GET /sd on the metrics port: the node list for Prometheus's http_sd_configs."""
        return "application/json", json.dumps(self.servicer.scrape_targets()).encode()

    def start(self) -> CoordinatorDaemon:
        """Starts metrics (if enabled), binds and starts the gRPC server and the sweeper.

        Raises:
            OSError: the gRPC or metrics address cannot be bound (nothing is left running).
        """
        self.metrics = daemon.start_metrics(self.registry, self.host, self._metrics_port,
                                            routes={"/sd": self._scrape_targets})
        server = rpc.make_server(max_workers=self._threads)
        try:
            self.port = rpc.bind(server, self.host, self.port)
        except OSError:
            if self.metrics:
                self.metrics.shutdown()
            raise
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(self.servicer, server)
        self._health = rpc.add_health(server, SERVICE_NAME)
        server.start()
        self._server = server
        self._sweeper = threading.Thread(target=self._sweep_loop, name="lease-sweeper",
                                         daemon=True)
        self._sweeper.start()
        log.info("coordinator serving on %s (lease %d ms)", self.address,
                 self.servicer.lease_ms)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Reports NOT_SERVING, stops the sweeper, answers held long-polls, then stops the
        server (in-flight RPCs get `grace` seconds) and the metrics endpoint."""
        self._stopping.set()
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._sweeper is not None:
            self._sweeper.join(timeout=grace)
        self.servicer.sweep()  # writes what is unsaved (state dir)
        self.servicer.shutdown()  # held long-polls answer now, not at the end of their hold
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1.0)
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics = None
        log.info("coordinator stopped")

    def wait(self, timeout: float) -> bool:
        """Waits up to timeout seconds; True once the server has terminated."""
        if self._server is None:
            return True
        return not self._server.wait_for_termination(timeout)

    def _sweep_loop(self) -> None:
        period = self.servicer.lease_ms / 4000.0  # the servicer's sweep_period_s
        while not self._stopping.wait(period):
            try:
                self.servicer.sweep()
            except Exception:  # a bug here must not end lease expiry for good
                log.exception("lease sweep failed")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `shardps-coordinator`."""
    parser = argparse.ArgumentParser(
        prog="shardps-coordinator",
        description="The shardps coordinator: membership, jobs, shard maps, convergence.")
    daemon.add_common_args(parser, default_port=7070)
    parser.add_argument("--lease-ms", type=int, default=5000,
                        help="node lease in ms; nodes heartbeat every lease/4 (default 5000)")
    parser.add_argument("--state-dir", default=None,
                        help="directory for the coordinator's state (nodes, jobs, shard maps, "
                             "histories), created if missing; a restart with the same one "
                             "carries on with its jobs (default: state in memory only)")
    parser.add_argument("--max-held-calls", type=int, default=MAX_HELD_CALLS, metavar="N",
                        help="long-polls held at once: idle workers waiting for an assignment, "
                             "workers waiting for a job to start; each takes a thread, and "
                             f"calls beyond N are answered at once (default {MAX_HELD_CALLS})")
    args = parser.parse_args(argv)
    if args.lease_ms <= 0:
        parser.error(f"--lease-ms must be > 0, got {args.lease_ms}")
    if args.max_held_calls < 0:
        parser.error(f"--max-held-calls must be >= 0, got {args.max_held_calls}")
    daemon.setup_logging(args.log_level, args.log_format, "coordinator")
    try:
        daemon.configure_security(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.state_dir:
        try:
            os.makedirs(args.state_dir, exist_ok=True)
        except OSError as exc:
            rpc.fail(f"cannot create --state-dir {args.state_dir}: {exc}", exitcodes.STATE_ERROR)
    try:
        coordinator = CoordinatorDaemon(args.host, args.port, args.lease_ms, args.metrics_port,
                                        state_dir=args.state_dir,
                                        max_held_calls=args.max_held_calls)
    except (StateError, OSError) as exc:
        rpc.fail(f"cannot use --state-dir {args.state_dir}: {exc}", exitcodes.STATE_ERROR)
    try:
        coordinator.start()
    except OSError as exc:
        rpc.fail(str(exc), exitcodes.BIND_FAILED)
    daemon.run_until_signal(coordinator.stop, coordinator.wait,
                          ready=lambda: rpc.announce(args.host, coordinator.port))
    return exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())
