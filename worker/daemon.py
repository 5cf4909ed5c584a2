"""The worker daemon (`shardps-worker`): registers and heartbeats with the coordinator and runs
the job its heartbeat assignment names, one at a time, in a training thread."""

from __future__ import annotations

import argparse
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch
from prometheus_client import CollectorRegistry

from shardps.proto import common_pb2, coordinator_pb2, exitcodes
from shardps.runtime import daemon as daemon_lib
from shardps.runtime import rpc
from shardps.runtime.nodelink import NodeLink
from shardps.worker import plugins
from shardps.worker.metrics import WorkerMetrics
from shardps.worker.trainer import Trainer

logger = logging.getLogger(__name__)

HEALTH_SERVICE = "shardps.v1.Worker"
RETRY_ABANDONED_S = 10.0     # an abandoned job that is still assigned to us is retried after this
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
    registration and heartbeats run on a NodeLink (runtime/nodelink.py) that retries an
    unreachable coordinator with backoff forever. The daemon is the link's NodeRole: an idle
    worker's heartbeat is a long-poll held until it has an assignment, and every reply's
    assignment starts, updates or stops the training thread. `stop(grace)` is thread-safe and
    idempotent. `step_delay_ms` > 0 makes every training step that much slower (a straggler
    on purpose); it applies to jobs started after it is set.
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
        self.link: NodeLink | None = None
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._ended: dict[str, tuple[str, float]] = {}  # job id -> (outcome kind, when ended)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._done = threading.Event()  # stopped, or must stop (`refusal`)
        self.refusal = ""  # why the coordinator refused to register us for good, if it did
        self._server: grpc.Server | None = None
        self._metrics_endpoint: daemon_lib.MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return self._metrics_endpoint.address if self._metrics_endpoint else ""

    @property
    def node_id(self) -> str:
        """The id the coordinator gave this worker ("" until it has registered)."""
        return self.link.node_id if self.link else ""

    @property
    def incarnation(self) -> int:
        return self.link.incarnation if self.link else 0

    def start(self) -> None:
        """Binds and starts serving; registration follows on the link's thread."""
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
        self.link = NodeLink(self.coordinator_address, self, on_refused=self._refused).start()
        logger.info("worker on %s (device %s), coordinator %s", self.address, self.device,
                    self.coordinator_address)

    def stop(self, grace: float = 5.0) -> None:
        """Stops training, says goodbye to the coordinator and shuts the server down."""
        with self._lock:
            already = self._stopping.is_set()
            self._stopping.set()
            job = self._job
        if self.link is not None:  # an idle worker's long-poll ends now
            self.link.halt()
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
        if self.link is not None:  # after the trainer's last reports: goodbye marks us DEAD
            self.link.stop()
        if self._server is not None:
            self._server.stop(grace).wait(grace)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.shutdown()
        self._stopped.set()
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the daemon has stopped or must (`refusal`); waits up to timeout."""
        return self._done.wait(timeout)

    def _refused(self, message: str) -> None:
        """The link's thread: the coordinator will never register us (e.g. an address over
        its limit); main() stops the daemon and exits with exitcodes.REFUSED."""
        self.refusal = message
        self._done.set()

    # -- the NodeRole: called on the link's thread --

    def registration(self) -> coordinator_pb2.RegisterNodeRequest:
        metrics = (f"{self.advertise_host}:{self._metrics_endpoint.port}"
                   if self._metrics_endpoint else "")
        return coordinator_pb2.RegisterNodeRequest(
            role=common_pb2.ROLE_WORKER, address=f"{self.advertise_host}:{self.port}",
            metrics_address=metrics, device=self.device)

    def registered(self, reply: coordinator_pb2.RegisterNodeResponse) -> None:
        pass  # a job of an earlier incarnation is stopped by the next reply's assignment

    def heartbeat(self, lease_ms: int) -> coordinator_pb2.HeartbeatRequest:
        """An idle worker's heartbeat is a long-poll held up to lease/4 until it has an
        assignment, so it starts a job as soon as the coordinator assigns one."""
        return coordinator_pb2.HeartbeatRequest(
            wait_for_assignment_ms=lease_ms // 4 if self._idle() else 0)

    def answered(self, reply: coordinator_pb2.HeartbeatResponse) -> None:
        self._on_assignment(reply.assignment)

    def forgotten(self) -> None:
        self._stop_job("the coordinator no longer knows this worker")

    def undelivered(self, restored: Sequence[coordinator_pb2.ShardVersion]) -> None:
        pass  # a worker restores nothing

    # -- the training thread --

    def _idle(self) -> bool:
        """No training thread runs (one that has ended may still be listed)."""
        with self._lock:
            return self._job is None or not self._job.thread.is_alive()

    def _on_assignment(self, assignment: coordinator_pb2.WorkerAssignment) -> None:
        """Starts, updates or stops the training thread to match the coordinator's assignment."""
        assert self.link is not None  # start() made it; the link calls us
        incarnation = self.link.incarnation
        with self._lock:
            if self._stopping.is_set():
                return
            job = self._job
            if job is not None and not job.thread.is_alive():
                self._job = job = None
            if job is not None:
                if job.trainer.incarnation != incarnation:
                    job.stopped_by_daemon = True
                    job.trainer.stop(f"this worker registered again (incarnation "
                                     f"{incarnation})")
                elif assignment.job_id != job.trainer.job_id:
                    job.stopped_by_daemon = True
                    job.trainer.stop(f"assignment changed to {assignment.job_id or 'idle'}")
                elif assignment != job.trainer.assignment():
                    job.trainer.update_assignment(assignment)
                return  # a new job starts once the old thread has ended (a later heartbeat)
            if not assignment.job_id or not self._may_start(assignment.job_id):
                return
            trainer = Trainer(self.link.stub, self.link.node_id, incarnation, assignment,
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
                # again (unless the link already has) and rejoin when assigned.
                if self.link is not None:
                    self.link.register_again(trainer.incarnation)
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
        # One write: print() writes the line and its newline apart, and a log line from
        # another thread on the same pipe can land between them (launchers read this line).
        sys.stdout.write(f"metrics on {worker.metrics_address}\n")
        sys.stdout.flush()
    daemon_lib.run_until_signal(worker.stop, worker.wait,
                          ready=lambda: rpc.announce(args.host, worker.port))
    if worker.refusal:
        rpc.fail(worker.refusal, exitcodes.REFUSED)
    return exitcodes.OK
