"""The `shardps-server` daemon: gRPC server, health, metrics and the coordinator link."""

from __future__ import annotations

import argparse
import logging
import socket
import threading

import torch

from shardps.proto import exitcodes, ps_pb2_grpc
from shardps.runtime import daemon, rpc

from .checkpoint_servicer import CheckpointingServicer
from .checkpointer import Checkpointer
from .datadir import NODE_ID_FILE
from .dataserver import DataServer
from .errors import ShardError
from .heartbeat import CoordinatorLink
from .joining import Joining
from .metrics import PSMetrics
from .registry import ShardRegistry
from .replication import DROPPED, LEASE_FRACTION, Placement, Replicas
from .servicer import SERVICE_NAME
from .transfer import TransferSender

log = logging.getLogger("shardps.ps")

GRPC_WORKERS = 64  # waiting pulls hold a thread each (up to 60 s), so leave room for pushes
_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


class ParameterServerDaemon:
    """One parameter server process: serves ParameterServer on host:port.

    Lifecycle: `start()` binds and serves (raises OSError if an address cannot be bound),
    `stop(grace)` shuts down, `wait(timeout)` reports whether it has stopped or must (the
    coordinator refused its registration for good: `refusal` says why). With
    `coordinator=None` it runs standalone (no registration; job states only from InitShard).
    Thread-safety: start/stop from one thread; everything else runs on gRPC and
    heartbeat threads.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, coordinator: str | None = None,
                 metrics_port: int = -1, advertise: str | None = None,
                 threads: int | None = None, grpc_workers: int = GRPC_WORKERS,
                 data_dir: str | None = None, data_port: int = 0, shared_memory: bool = True):
        """
        Args:
            host, port: address to bind; port 0 picks a free one.
            coordinator: host:port of the coordinator, or None to run standalone.
            metrics_port: Prometheus port; 0 picks one, negative disables.
            advertise: host:port to register (default: the bound address).
            threads: torch intra-op threads for Adam (process-wide); None leaves torch's.
            grpc_workers: size of the gRPC handler thread pool.
            data_dir: where checkpoints and the node id live; None disables checkpoints.
                On start, every shard found there is restored from its newest valid
                checkpoint and the server registers under its old node id.
            data_port: the data plane's TCP port on `host` (push and pull without gRPC's
                copies, proto/dataplane.py); 0 picks a free one, negative disables it.
            shared_memory: offer the data plane's same-host path (a segment in /dev/shm per
                connection) to clients that connect between loopback addresses.
        """
        self.host = host
        self.port = port
        self.coordinator = coordinator
        self.metrics_port = metrics_port
        self.advertise = advertise
        self.threads = threads
        self.data_port = data_port
        self.shared_memory = shared_memory
        self.metrics_registry = daemon.new_registry()
        self.checkpointer = (Checkpointer(data_dir, self.metrics_registry)
                             if data_dir else None)
        self.shards = ShardRegistry(self.checkpointer.attach if self.checkpointer else None)
        self.metrics = PSMetrics(self.metrics_registry, self.shards)
        self.servicer = CheckpointingServicer(self.shards, self.metrics, self.checkpointer)
        self.replicas = Replicas(lambda: self.link.node_id if self.link else "",
                                 lambda: self.link is not None and self.link.in_touch(LEASE_FRACTION))
        self.servicer.bulk.replicas = self.replicas
        # Catch-up by transfer: this server as a primary sending (transfer.py) and as a
        # joining copy receiving (joining.py).
        self.joining = Joining(self.shards, self._node_id)
        self.servicer.bulk.joining = self.joining
        self.transfers = TransferSender(self.replicas, self.shards, self._node_id,
                                        lambda result: self.metrics.transfers.labels(result).inc())
        self.replicas.on_placement += [self.joining.placement_changed,
                                       self.transfers.placement_changed, self._drop_dropped]
        self.metrics_endpoint: daemon.MetricsEndpoint | None = None
        self.link: CoordinatorLink | None = None
        self._grpc_workers = grpc_workers
        self._server = rpc.make_server(grpc_workers)
        ps_pb2_grpc.add_ParameterServerServicer_to_server(self.servicer, self._server)
        self._health = rpc.add_health(self._server, SERVICE_NAME)
        self.data_server: DataServer | None = None
        self._stopped = threading.Event()
        self._ended = threading.Event()  # stopped, or refused by the coordinator
        self.refusal = ""
        self._stop_lock = threading.Lock()
        self._started = False

    @property
    def address(self) -> str:
        """host:port actually bound (valid after start)."""
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return self.metrics_endpoint.address if self.metrics_endpoint else ""

    def start(self) -> ParameterServerDaemon:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.checkpointer:  # before serving: a worker must never see a shard missing
            for shard in self.checkpointer.restore_all():
                try:
                    self.shards.put(shard)
                    self.replicas.adopt(shard.job_id, shard.config.replica_map)
                except (OSError, ShardError) as exc:  # a data dir is input: never stop here
                    log.error("job %s shard %d restored but not served: %s", shard.job_id,
                              shard.index, exc)
        try:
            self.port = rpc.bind(self._server, self.host, self.port)
            if self.data_port >= 0:
                # As many connections as the gRPC server takes concurrent calls.
                self.data_server = DataServer(self.servicer.bulk, rpc.current_security(),
                                              max_connections=self._grpc_workers * 4,
                                              rows=self.servicer.rows,
                                              shared_memory=self.shared_memory)
                self.data_port = self.data_server.start(self.host, self.data_port)
                self.servicer.data_port = self.data_port
            self.metrics_endpoint = daemon.start_metrics(self.metrics_registry, self.host,
                                                         self.metrics_port)
        except OSError:
            self._server.stop(None)
            if self.data_server:
                self.data_server.stop(0)
            raise
        self._server.start()
        self._started = True
        log.info("parameter server serving on %s (data plane: %s)", self.address,
                 f"port {self.data_port}" if self.data_server else "off")
        if self.coordinator:
            advertised = self.advertise or self._default_advertise()
            metrics = ""
            if self.metrics_endpoint:
                metrics = f"{advertised.rsplit(':', 1)[0]}:{self.metrics_endpoint.port}"
            self.link = CoordinatorLink(
                self.coordinator, advertised, metrics, self._on_views,
                node_id=self.checkpointer.node_id() if self.checkpointer else "",
                checkpoints=self.checkpointer, frozen=self.shards.frozen,
                caught_up=self.joining.caught_up,
                on_refused=self._refused).start()
        return self

    def _on_views(self, views) -> None:
        for view in views:  # replicated jobs: who is primary now (before any push is taken)
            if view.HasField("shard_map"):
                self.replicas.adopt(view.job_id, view.shard_map)
        if self.checkpointer:  # a sync rollback first: it reloads workers and epoch
            self.checkpointer.apply_rollbacks(self.shards.shards(), views)
        settled = self.shards.apply_views(views)
        if self.checkpointer:  # the job's final weights: durable before anything else
            for shard in settled:
                self.checkpointer.final_weights(shard)

    def _drop_dropped(self, job_id: str, index: int, placement: Placement) -> None:
        """A Replicas.on_placement hook: a copy that the map no longer names (its shard moved
        away, or failed over) is freed; calls still on it fail or, for pulls waiting on it,
        end at once, and their workers re-read the map. A server without a node id (no
        coordinator, or not registered yet) cannot tell which copies are its own: it keeps them."""
        node_id = self._node_id()
        if node_id and placement.role(node_id) == DROPPED:
            self.shards.drop_shard(job_id, index)

    def _node_id(self) -> str:
        return self.link.node_id if self.link else ""

    def _refused(self, message: str) -> None:
        if self.checkpointer and self.checkpointer.node_id():
            message += (f" (the node id is read from {NODE_ID_FILE} in --data-dir: remove that "
                        "file to register as a new node)")
        self.refusal = message
        self._ended.set()

    def _default_advertise(self) -> str:
        if self.host in _WILDCARDS:
            return f"{socket.getfqdn()}:{self.port}"
        return self.address

    def stop(self, grace: float = 5.0) -> None:
        """Stops serving (in-flight RPCs get `grace` seconds), then leaves the coordinator."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._health.enter_graceful_shutdown()
            self.servicer.shutdown()
            if self._started:
                self._server.stop(grace).wait(grace + 5)
            if self.data_server:
                self.data_server.stop(grace)
            if self.checkpointer:  # pushes have stopped: the final checkpoint
                self.checkpointer.final(self.shards.shards())
                self.checkpointer.shutdown()
            self.shards.close()
            self.replicas.close()
            self.transfers.shutdown()
            if self.link:
                self.link.stop()
            if self.metrics_endpoint:
                self.metrics_endpoint.shutdown()
            log.info("parameter server stopped")
            self._stopped.set()
            self._ended.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` s; True once the daemon has stopped or must (`refusal`)."""
        return self._ended.wait(timeout)


def _hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shardps-server",
        description="shardps parameter server: holds fp32 weight shards and applies Adam.",
        epilog="--coordinator '' runs standalone (no registration, no heartbeats).")
    daemon.add_common_args(parser, default_port=0)
    daemon.add_coordinator_arg(parser)
    parser.add_argument("--advertise", type=_hostport, metavar="HOST:PORT",
                        help="address to register with the coordinator (default: the bound "
                             "host:port)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="directory for checkpoints and the node id, created if missing; "
                             "a restart with the same one restores every shard and keeps the "
                             "node id (default: no checkpoints)")
    parser.add_argument("--data-port", type=int, default=0, metavar="PORT",
                        help="TCP port of the data plane (push and pull as raw frames beside "
                             "gRPC, on --host, with the same TLS and token); 0 picks a free "
                             "one (default), -1 turns it off (workers then push and pull over "
                             "gRPC)")
    parser.add_argument("--shared-memory", choices=("on", "off"), default="on",
                        help="offer data-plane clients on loopback the same-host path: pushed "
                             "and pulled elements go through a segment in /dev/shm instead "
                             "of the socket (default on)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch intra-op threads for Adam (default 1)")
    args = parser.parse_args(argv)
    daemon.setup_logging(args.log_level, args.log_format, "server")
    try:
        daemon.configure_security(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        server = ParameterServerDaemon(args.host, args.port, args.coordinator or None,
                                       args.metrics_port, advertise=args.advertise,
                                       threads=args.threads, data_dir=args.data_dir,
                                       data_port=args.data_port,
                                       shared_memory=args.shared_memory == "on")
    except OSError as exc:
        rpc.fail(f"cannot use --data-dir {args.data_dir}: {exc}", exitcodes.STATE_ERROR)
    try:
        server.start()
    except OSError as exc:
        rpc.fail(str(exc), exitcodes.BIND_FAILED)
    daemon.run_until_signal(server.stop, server.wait,
                          ready=lambda: rpc.announce(args.host, server.port))
    if server.refusal:
        rpc.fail(server.refusal, exitcodes.REFUSED)
    return exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())
