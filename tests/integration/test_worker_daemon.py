"""The worker daemon against the real coordinator (and servers) in this process on port 0:
registration, heartbeats, re-registration, job start/stop by assignment, the goodbye
heartbeat, the CLI."""

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.proto import common_pb2, coordinator_pb2
from shardps.worker import daemon as worker_daemon
from shardps.worker.daemon import WorkerDaemon
from tests import harness
from tests.cluster import Cluster

ALIVE, DEAD = coordinator_pb2.NODE_STATE_ALIVE, coordinator_pb2.NODE_STATE_DEAD


def poll(condition, timeout=10.0, what="condition"):
    return harness.poll(condition, timeout, interval=0.02, what=what)


def node_at(client, address):
    return next((n for n in client.nodes() if n.address == address), None)


def test_registers_heartbeats_serves_health_and_says_goodbye(coordinators):
    lease_ms = 600
    first, client = coordinators(lease_ms=lease_ms)
    worker = WorkerDaemon(first.address, port=0, device="cpu", metrics_port=0)
    worker.start()
    try:
        assert worker.port > 0 and worker.metrics_address
        with grpc.insecure_channel(worker.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service="shardps.v1.Worker"),
                                 timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The coordinator lists the node before the worker has read its reply: wait for both.
        node = poll(lambda: worker.node_id and node_at(client, worker.address),
                    what="registration")
        registered = time.monotonic()
        assert (node.role, node.state, node.device) == (common_pb2.ROLE_WORKER, ALIVE, "cpu")
        assert node.metrics_address == worker.metrics_address
        assert node.node_id == worker.node_id and node.incarnation == 1

        def held_for_three_leases():
            assert node_at(client, worker.address).state == ALIVE  # heartbeats renew it
            return time.monotonic() - registered > 3 * lease_ms / 1000
        poll(held_for_three_leases, what="three leases")

        # The coordinator restarts on the same port and knows nobody: the worker registers
        # again under the same id.
        port = first.port
        first.stop(0)
        client.close()
        second, client = coordinators(port=port)
        again = poll(lambda: node_at(client, worker.address), what="re-registration")
        assert again.node_id == node.node_id and again.state == ALIVE
    finally:
        worker.stop(grace=2)
    assert worker.wait(0)
    # The goodbye heartbeat marks it dead at once (its 10 s lease has not run out).
    assert node_at(client, worker.address).state == DEAD
    client.close()


def test_a_job_that_ended_here_is_not_started_again():
    # async, 2 workers: rank 1 reaches the step budget long before the slow rank 0, so its
    # assignment lingers while the job runs on; the daemon must not train it a second time.
    # Cluster() returns once every worker knows its id (it once sorted a worker whose id was
    # still "" first, and slowed the wrong rank).
    cluster = Cluster(servers=1, workers=2, lease_ms=1000)
    try:
        rank0, rank1 = sorted(cluster.workers, key=lambda w: w.node_id)  # ranks follow ids
        rank0.step_delay_ms = 100
        job_id = cluster.submit({"model": {"name": "mlp", "kwargs": {"hidden": [16]}},
                                 "data": {"dataset": "digits", "batch_size": 32},
                                 "consistency": {"mode": "async"},
                                 "cluster": {"servers": 1, "workers": 2},
                                 "stop": {"max_steps": 10, "eval_every": 100}})
        poll(lambda: job_id in rank1._ended, 30, what="rank 1 finishing")
        kind, ended_at = rank1._ended[job_id]
        assert kind == "finished"
        assert cluster.job(job_id).state == common_pb2.JOB_STATE_RUNNING
        assert node_at(cluster.client, rank1.address).job_id == job_id  # still assigned
        info = cluster.wait(job_id, timeout=60)
        assert info.state == common_pb2.JOB_STATE_COMPLETED, info.reason
        steps = rank1.metrics.steps.labels(job=job_id)._value.get()
        assert steps == 10 and rank1._ended[job_id] == (kind, ended_at)
    finally:
        cluster.close()


def test_idle_workers_long_poll_start_their_job_at_once_and_stop_cancels_the_poll():
    # A 2 min lease: workers heartbeat every 30 s, so a job that completes within the wait
    # below reached its worker through the held heartbeat, not the next periodic one.
    cluster = Cluster(servers=1, workers=2, lease_ms=120_000)
    metrics = cluster.coordinator.servicer.metrics
    try:
        poll(lambda: metrics.held_calls._value.get() == 2, 30, what="both idle workers held")
        job_id = cluster.submit({"model": {"name": "mlp", "kwargs": {"hidden": [16]}},
                                 "data": {"dataset": "digits", "batch_size": 32},
                                 "cluster": {"servers": 1, "workers": 1},
                                 "stop": {"max_steps": 5, "eval_every": 100}})
        info = cluster.wait(job_id, timeout=25)
        assert info.state == common_pb2.JOB_STATE_COMPLETED, info.reason
        assert metrics.long_polls.labels("heartbeat", "woken")._value.get() == 1
        idle = next(w for w in cluster.workers if not w._ended)
        assert metrics.held_calls._value.get() == 1  # the other one is still held
        idle.stop(grace=2)
        assert idle.link is not None and not idle.link.running
        assert node_at(cluster.client, idle.address).state == DEAD  # and it said goodbye
    finally:
        cluster.close()


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


def test_cli_refuses_a_negative_step_delay(capsys):
    with pytest.raises(SystemExit) as err:
        worker_daemon.main(["--device", "cpu", "--step-delay-ms", "-1"])
    assert err.value.code == 2
    assert "--step-delay-ms must be >= 0" in capsys.readouterr().err


def test_console_script_prints_its_address_and_exits_cleanly(coordinators):
    coordinator, client = coordinators()
    worker = harness.start("shardps-worker", "--port", "0", "--metrics-port", "0",
                           "--device", "cpu", "--coordinator", coordinator.address)
    assert worker.address.startswith("127.0.0.1:") and worker.metrics_address
    node = poll(lambda: node_at(client, worker.address), timeout=30,
                what="the subprocess registering")
    assert node.state == ALIVE and node.metrics_address == worker.metrics_address
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert node_at(client, worker.address).state == DEAD  # said goodbye
    client.close()


def test_console_script_rejects_a_missing_cuda_device():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    result = harness.subprocess.run([*harness.script("shardps-worker"), "--device", "cuda"],
                                    capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr
