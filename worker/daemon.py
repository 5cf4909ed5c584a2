"""The worker daemon (`shardps-worker`): registers and heartbeats with the coordinator and runs
the job its heartbeat assignment names, one at a time, in a training thread."""

from __future__ import annotations

import argparse
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass

import grpc
import torch
from prometheus_client import CollectorRegistry

from shardps.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc, exitcodes
from shardps.runtime import daemon as daemon_lib
from shardps.runtime import rpc
from shardps.worker import plugins
from shardps.worker.metrics import WorkerMetrics
from shardps.worker.trainer import Trainer

logger = logging.getLogger(__name__)

HEALTH_SERVICE = "shardps.v1.Worker"
DEFAULT_LEASE_MS = 5000      # until the coordinator tells us its lease
MAX_BACKOFF_S = 10.0         # cap of the retry pause while the coordinator is unreachable
RETRY_ABANDONED_S = 10.0     # an abandoned job that is still assigned to us is retried after this
FINAL_HEARTBEAT_S = 2.0      # deadline of the shutting_down heartbeat
_DEVICE = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(name: str) -> str:
    """Turns --device (auto, cpu, cuda, cuda:N) into a concrete device string.

    auto is cuda:<current> when CUDA is available, else cpu. Raises ValueError, with a message
    for the command line, for an unknown name or a CUDA device this host does not have.
    """
    if name == "cpu":
        return "cpu"
    if name == "auto":
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    match = _DEVICE.match(name)
    if not match:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    index = int(match.group(1)) if match.group(1) else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this host has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    return f"cuda:{index}"


@dataclass
class _Job:
    """The job in progress: its trainer and thread, and whether the daemon asked it to stop."""

    trainer: Trainer
    thread: threading.Thread
    stopped_by_daemon: bool = False


class WorkerDaemon:
    """A worker process: gRPC health, heartbeats, metrics and one training thread at a time.

    `start()` binds (port 0 picks a free port; raises OSError if it cannot bind) and returns;
    registration and heartbeats run in a background thread that retries an unreachable
    coordinator with backoff forever (logged). `stop(grace)` is thread-safe and idempotent.
    `step_delay_ms` > 0 makes every training step that much slower (a straggler on purpose);
    it applies to jobs started after it is set.
    """

    def __init__(self, coordinator: str, host: str = "127.0.0.1", port: int = 0,
                 device: str = "cpu", metrics_port: int = -1, threads: int = 0,
                 registry: CollectorRegistry | None = None, step_delay_ms: int = 0,
                 advertise_host: str | None = None):
        self.coordinator_address = coordinator
        self.host = host
        # What the coordinator (and Prometheus, through its /sd list) is told to reach us at:
        # a wildcard bind address reaches nobody, so it defaults to this host's name.
        self.advertise_host = advertise_host or (socket.getfqdn() if host in ("0.0.0.0", "::", "") else host)
        self.port = port
        self.device = device
        self.metrics_port = metrics_port
        self.threads = threads
        self.step_delay_ms = step_delay_ms
        self.registry = registry if registry is not None else daemon_lib.new_registry()
        self.metrics = WorkerMetrics(self.registry)
        self.node_id = ""
        self.incarnation = 0
        self.lease_ms = DEFAULT_LEASE_MS
        self._registered = False
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._ended: dict[str, tuple[str, float]] = {}  # job id -> (outcome kind, when ended)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._server: grpc.Server | None = None
        self._metrics_endpoint: daemon_lib.MetricsEndpoint | None = None
        self._channel: grpc.Channel | None = None
        self._stub: coordinator_pb2_grpc.CoordinatorStub | None = None
        self._heartbeats: threading.Thread | None = None
        self._heartbeat_call: grpc.Future | None = None  # the one in flight, cancelled by stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return self._metrics_endpoint.address if self._metrics_endpoint else ""

    def start(self) -> None:
        """Binds and starts serving; registration follows in the heartbeat thread."""
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        self._server = rpc.make_server(max_workers=4)
        try:
            self.port = rpc.bind(self._server, self.host, self.port)
            rpc.add_health(self._server, HEALTH_SERVICE)
            if self.metrics_port >= 0:
                self._metrics_endpoint = daemon_lib.MetricsEndpoint(
                    self.registry, self.host, self.metrics_port)
        except OSError:
            self._server.stop(None)
            raise
        self._server.start()
        self.metrics.info.labels(device=self.device).set(1)
        self._channel = rpc.make_channel(self.coordinator_address)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._heartbeats = threading.Thread(target=self._heartbeat_loop, name="heartbeat",
                                            daemon=True)
        self._heartbeats.start()
        logger.info("worker on %s (device %s), coordinator %s", self.address, self.device,
                    self.coordinator_address)

    def stop(self, grace: float = 5.0) -> None:
        """Stops training, says goodbye to the coordinator and shuts the server down."""
        with self._lock:
            if self._stopping.is_set():
                already = True
            else:
                already = False
                self._stopping.set()
            job = self._job
            heartbeat_call = self._heartbeat_call
        if heartbeat_call is not None:  # an idle worker's long-poll: end it now
            heartbeat_call.cancel()
        if already:
            self._stopped.wait(grace + rpc.CONTROL_DEADLINE_S)
            return
        if job is not None:
            job.stopped_by_daemon = True
            job.trainer.stop("the worker is shutting down")
            job.thread.join(grace)
            if job.thread.is_alive():
                logger.warning("training thread of job %s did not stop within %.1f s",
                               job.trainer.job_id, grace)
        if self._heartbeats is not None:
            self._heartbeats.join(rpc.CONTROL_DEADLINE_S)
        if self._registered and self._stub is not None:
            try:
                self._stub.Heartbeat(coordinator_pb2.HeartbeatRequest(
                    node_id=self.node_id, incarnation=self.incarnation, shutting_down=True),
                    timeout=FINAL_HEARTBEAT_S, wait_for_ready=True)  # ride out a reconnect backoff
            except grpc.RpcError as exc:
                logger.warning("final heartbeat failed: %s", exc.code().name)
        if self._server is not None:
            self._server.stop(grace).wait(grace)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.shutdown()
        if self._channel is not None:
            self._channel.close()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the daemon has stopped; waits up to timeout."""
        return self._stopped.wait(timeout)

    # -- heartbeat thread --

    def _heartbeat_loop(self) -> None:
        """Heartbeats every lease/4 (from the start of one to the start of the next). An idle
        worker's heartbeat is a long-poll held up to that interval until it has an assignment,
        so it starts a job as soon as the coordinator assigns one."""
        backoff = 0.5
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                if not self._registered:
                    self._register()
                reply = self._heartbeat()
            except grpc.RpcError as exc:
                logger.warning("coordinator %s: %s (%s); retrying in %.1f s",
                               self.coordinator_address, exc.code().name, exc.details(), backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            if reply is None:
                break  # stopping
            backoff = 0.5
            if reply.unknown_node:
                logger.warning("the coordinator does not know %s incarnation %d; registering "
                               "again", self.node_id, self.incarnation)
                self._registered = False
                self._stop_job("the coordinator no longer knows this worker")
                continue
            if reply.lease_ms > 0:
                self.lease_ms = reply.lease_ms
            self._on_assignment(reply.assignment)
            self._stopping.wait(max(0.0, self.lease_ms / 4000.0 - (time.monotonic() - started)))

    def _register(self) -> None:
        assert self._stub is not None  # start() made it
        reply = self._stub.RegisterNode(coordinator_pb2.RegisterNodeRequest(
            role=common_pb2.ROLE_WORKER, address=f"{self.advertise_host}:{self.port}", node_id=self.node_id,
            metrics_address=(f"{self.advertise_host}:{self._metrics_endpoint.port}"
                             if self._metrics_endpoint else ""), device=self.device,
            hostname=socket.gethostname()), timeout=rpc.CONTROL_DEADLINE_S)
        self.node_id, self.incarnation = reply.node_id, reply.incarnation
        daemon_lib.set_log_node(self.node_id)
        if reply.lease_ms > 0:
            self.lease_ms = reply.lease_ms
        self._registered = True
        logger.info("registered as %s incarnation %d (lease %d ms)", self.node_id,
                    self.incarnation, self.lease_ms)

    def _heartbeat(self) -> coordinator_pb2.HeartbeatResponse | None:
        # A heartbeat older than the lease is useless; never wait longer than that for one
        # (plus the hold of a long-poll).
        deadline = min(rpc.CONTROL_DEADLINE_S, max(self.lease_ms / 1000.0, 0.5))
        hold_ms = self.lease_ms // 4 if self._idle() else 0
        assert self._stub is not None
        with self._lock:
            if self._stopping.is_set():
                return None  # stop() is under way: no call it could not cancel
            call = self._heartbeat_call = self._stub.Heartbeat.future(
                coordinator_pb2.HeartbeatRequest(node_id=self.node_id, incarnation=self.incarnation,
                                                 wait_for_assignment_ms=hold_ms),
                timeout=deadline + hold_ms / 1000.0)
        try:
            return call.result()
        except grpc.FutureCancelledError:
            return None  # by stop()
        finally:
            with self._lock:
                self._heartbeat_call = None

    def _idle(self) -> bool:
        """No training thread runs (one that has ended may still be listed)."""
        with self._lock:
            return self._job is None or not self._job.thread.is_alive()

    def _on_assignment(self, assignment: coordinator_pb2.WorkerAssignment) -> None:
        """Starts, updates or stops the training thread to match the coordinator's assignment."""
        with self._lock:
            if self._stopping.is_set():
                return
            job = self._job
            if job is not None and not job.thread.is_alive():
                self._job = job = None
            if job is not None:
                if job.trainer.incarnation != self.incarnation:
                    job.stopped_by_daemon = True
                    job.trainer.stop(f"this worker registered again (incarnation "
                                     f"{self.incarnation})")
                elif assignment.job_id != job.trainer.job_id:
                    job.stopped_by_daemon = True
                    job.trainer.stop(f"assignment changed to {assignment.job_id or 'idle'}")
                elif assignment != job.trainer.assignment():
                    job.trainer.update_assignment(assignment)
                return  # a new job starts once the old thread has ended (a later heartbeat)
            if not assignment.job_id or not self._may_start(assignment.job_id):
                return
            trainer = Trainer(self._stub, self.node_id, self.incarnation, assignment,
                              self.device, self.metrics, step_delay_s=self.step_delay_ms / 1000)
            thread = threading.Thread(target=self._train, args=(trainer,), daemon=True,
                                      name=f"train-{assignment.job_id}")
            self._job = _Job(trainer, thread)
            logger.info("starting job %s as rank %d of %d", assignment.job_id, assignment.rank,
                        assignment.world_size)
            thread.start()

    def _may_start(self, job_id: str) -> bool:
        """A job that ended here on its own is not restarted while the assignment lingers;
        one that was abandoned (e.g. servers unreachable) is retried after a pause."""
        ended = self._ended.get(job_id)
        if ended is None:
            return True
        kind, when = ended
        return kind == "abandoned" and time.monotonic() - when >= RETRY_ABANDONED_S

    def _train(self, trainer: Trainer) -> None:
        with daemon_lib.job_log_context(trainer.assignment().job_id):
            outcome = trainer.run()
        with self._lock:
            job = self._job
            if outcome.kind == "fenced":
                # A server refused this incarnation: the coordinator declared it dead. Register
                # again (unless the heartbeat thread already has) and rejoin when assigned.
                if trainer.incarnation == self.incarnation:
                    self._registered = False
                logger.warning("job %s: incarnation %d fenced; rejoining as a new incarnation",
                               trainer.job_id, trainer.incarnation)
                return
            if job is not None and job.trainer is trainer and job.stopped_by_daemon:
                return  # stopped because the assignment went away: may be assigned again
            self._ended[trainer.job_id] = (outcome.kind, time.monotonic())
            while len(self._ended) > 1000:  # forget the oldest
                self._ended.pop(next(iter(self._ended)))

    def _stop_job(self, reason: str) -> None:
        with self._lock:
            if self._job is not None:
                self._job.stopped_by_daemon = True
                self._job.trainer.stop(reason)


def main(argv: list[str] | None = None) -> int:
    """`shardps-worker`: runs a worker daemon until SIGTERM/SIGINT; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="shardps-worker",
        description="A shardps worker: trains the jobs the coordinator assigns to it.")
    daemon_lib.add_common_args(parser, default_port=0)
    daemon_lib.add_coordinator_arg(parser)
    parser.add_argument("--advertise-host", metavar="HOST",
                        help="host name to register with the coordinator (default: --host, or this "
                             "machine's name when --host is a wildcard such as 0.0.0.0)")
    parser.add_argument("--allow-import", action="append", default=None, metavar="PREFIX",
                        help="only let jobs import model/data factories from modules under this "
                             "dotted prefix (repeatable); default: any module, i.e. whoever may "
                             "submit jobs may run code on this worker")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available, else cpu), cpu, cuda or cuda:N "
                             "(default auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads; 0 keeps torch's default (default 0)")
    parser.add_argument("--step-delay-ms", type=int, default=0, metavar="N",
                        help="emulate a straggler: sleep N ms in every training step, after "
                             "the backward pass (for testing ssp, sync barriers and "
                             "timeouts; default 0)")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.step_delay_ms < 0:
        parser.error(f"--step-delay-ms must be >= 0, got {args.step_delay_ms}")
    daemon_lib.setup_logging(args.log_level, args.log_format, "worker")
    plugins.allow_imports(args.allow_import)
    try:
        daemon_lib.configure_security(args)
    except ValueError as exc:
        parser.error(str(exc))
    worker = WorkerDaemon(args.coordinator, args.host, args.port, device, args.metrics_port,
                          args.threads, step_delay_ms=args.step_delay_ms,
                          advertise_host=args.advertise_host)
    try:
        worker.start()
    except OSError as exc:
        rpc.fail(str(exc), exitcodes.BIND_FAILED)
    if worker.metrics_address:
        print(f"metrics on {worker.metrics_address}", flush=True)
    daemon_lib.run_until_signal(worker.stop, worker.wait,
                          ready=lambda: rpc.announce(args.host, worker.port))
    return exitcodes.OK
