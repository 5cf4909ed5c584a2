"""The worker daemon against a scripted coordinator over real gRPC (port 0): registration,
heartbeats, re-registration, job start/stop by assignment, the goodbye heartbeat, the CLI."""

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc, rpc
from shardps.worker import daemon as worker_daemon
from shardps.worker.daemon import WorkerDaemon
from tests import harness


class ScriptedCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Records calls; heartbeats answer with `assignment`, or unknown_node once if asked."""

    def __init__(self):
        self.lock = threading.Lock()
        self.registrations = []
        self.heartbeats = []
        self.get_jobs = 0
        self.forget_once = False
        self.assignment = coordinator_pb2.WorkerAssignment()
        self.job_state = common_pb2.JOB_STATE_CANCELLED

    def RegisterNode(self, request, context):
        with self.lock:
            self.registrations.append(request)
            return coordinator_pb2.RegisterNodeResponse(
                node_id=request.node_id or "worker-00ff", incarnation=len(self.registrations),
                lease_ms=400)

    def Heartbeat(self, request, context):
        with self.lock:
            self.heartbeats.append(request)
            if self.forget_once:
                self.forget_once = False
                return coordinator_pb2.HeartbeatResponse(unknown_node=True)
            return coordinator_pb2.HeartbeatResponse(assignment=self.assignment, lease_ms=400)

    def GetJob(self, request, context):
        with self.lock:
            self.get_jobs += 1
            return coordinator_pb2.GetJobResponse(job=coordinator_pb2.JobInfo(
                job_id=request.job_id, state=self.job_state, reason="cancelled by a test"))


@pytest.fixture
def coordinator():
    fake = ScriptedCoordinator()
    server = rpc.make_server(4)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
    port = rpc.bind(server, "127.0.0.1", 0)
    server.start()
    fake.address = f"127.0.0.1:{port}"
    yield fake
    server.stop(None)


def poll(condition, timeout=10.0, what="condition"):
    return harness.poll(condition, timeout, interval=0.02, what=what)


def test_registers_heartbeats_serves_health_and_says_goodbye(coordinator):
    worker = WorkerDaemon(coordinator.address, port=0, device="cpu", metrics_port=0)
    worker.start()
    try:
        assert worker.port > 0 and worker.metrics_address
        with grpc.insecure_channel(worker.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service="shardps.v1.Worker"),
                                 timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        poll(lambda: len(coordinator.heartbeats) >= 3, what="three heartbeats")
        first = coordinator.registrations[0]
        assert first.role == common_pb2.ROLE_WORKER and first.device == "cpu"
        assert first.address == worker.address and first.metrics_address == worker.metrics_address
        assert {h.node_id for h in coordinator.heartbeats} == {"worker-00ff"}

        coordinator.forget_once = True  # the coordinator restarted: register again, same id
        poll(lambda: len(coordinator.registrations) == 2, what="re-registration")
        assert coordinator.registrations[1].node_id == "worker-00ff"
        poll(lambda: coordinator.heartbeats[-1].incarnation == 2, what="new incarnation")
    finally:
        worker.stop(grace=2)
    assert worker.wait(0)
    assert coordinator.heartbeats[-1].shutting_down
    assert coordinator.heartbeats[-1].incarnation == 2


def test_assignment_starts_a_job_once(coordinator):
    coordinator.assignment = coordinator_pb2.WorkerAssignment(job_id="job-7", rank=0,
                                                               world_size=1, epoch=1)
    worker = WorkerDaemon(coordinator.address, device="cpu")
    worker.start()
    try:
        poll(lambda: coordinator.get_jobs >= 1, what="the trainer fetching its job")
        beats = len(coordinator.heartbeats)
        poll(lambda: len(coordinator.heartbeats) >= beats + 4, what="more heartbeats")
        # The job was CANCELLED: the trainer ended, and the lingering assignment does not
        # start it again.
        assert coordinator.get_jobs == 1
        assert worker._ended["job-7"][0] == "stopped"
    finally:
        worker.stop(grace=2)


def test_unreachable_coordinator_is_retried_and_stop_is_prompt():
    worker = WorkerDaemon("127.0.0.1:1", device="cpu")  # nothing listens on port 1
    worker.start()
    time.sleep(0.3)
    started = time.monotonic()
    worker.stop(grace=2)
    assert time.monotonic() - started < 5
    assert worker.wait(0)


def test_resolve_device():
    assert worker_daemon.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        worker_daemon.resolve_device("gpu")
    import torch
    if not torch.cuda.is_available():
        assert worker_daemon.resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match="CUDA is not available"):
            worker_daemon.resolve_device("cuda:0")


def test_console_script_prints_its_address_and_exits_cleanly(coordinator):
    worker = harness.start("shardps-worker", "--port", "0", "--metrics-port", "0",
                           "--device", "cpu", "--coordinator", coordinator.address)
    assert worker.address.startswith("127.0.0.1:") and worker.metrics_address
    poll(lambda: coordinator.heartbeats, timeout=30, what="a heartbeat from the subprocess")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert coordinator.heartbeats[-1].shutting_down


def test_console_script_rejects_a_missing_cuda_device():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    result = harness.subprocess.run([*harness.script("shardps-worker"), "--device", "cuda"],
                                    capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr
