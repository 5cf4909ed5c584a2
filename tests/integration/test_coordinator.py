"""The coordinator daemon in-process on port 0, driven over real gRPC by stubs that act as
servers, workers and a client."""


import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.client.api import CoordinatorClient
from shardps.client.scrape import scrape
from shardps.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc, exitcodes
from shardps.proto.layout import make_layout
from shardps.runtime import rpc
from shardps.server.coordinator.daemon import CoordinatorDaemon, main
from tests.harness import poll, run_cli

pb = coordinator_pb2
DEADLINE = rpc.CONTROL_DEADLINE_S
SPEC = """
name: digits-mlp
model: {name: mlp}
data: {dataset: digits}
cluster: {servers: 2, workers: 2}
stop: {max_steps: 10, target: {metric: accuracy, value: 0.99}}
"""
LAYOUT = make_layout([("net.0.weight", (8, 4)), ("net.0.bias", (8,)), ("net.2.weight", (3, 8))])


@pytest.fixture
def start():
    """Starts coordinators on port 0; stops them and closes channels afterwards."""
    daemons, channels = [], []

    def _start(lease_ms=5000, **kwargs):
        daemon = CoordinatorDaemon("127.0.0.1", 0, lease_ms=lease_ms, metrics_port=0,
                                   **kwargs).start()
        daemons.append(daemon)
        channel = rpc.make_channel(daemon.address)
        channels.append(channel)
        return daemon, coordinator_pb2_grpc.CoordinatorStub(channel), channel

    yield _start
    for channel in channels:
        channel.close()
    for daemon in daemons:
        daemon.stop(0)


class FakeNode:
    """A server or worker: registers and heartbeats over the stub."""

    def __init__(self, stub, role, address=""):
        self.stub = stub
        reply = stub.RegisterNode(pb.RegisterNodeRequest(role=role, address=address,
                                                         hostname="test"), timeout=DEADLINE)
        self.node_id, self.incarnation = reply.node_id, reply.incarnation

    def beat(self, shutting_down=False):
        return self.stub.Heartbeat(pb.HeartbeatRequest(
            node_id=self.node_id, incarnation=self.incarnation, shutting_down=shutting_down),
            timeout=DEADLINE)

    def report(self, job_id, **fields):
        return self.stub.ReportProgress(pb.ReportProgressRequest(
            job_id=job_id, node_id=self.node_id, incarnation=self.incarnation, **fields),
            timeout=DEADLINE)


def abort_of(call, *args):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=DEADLINE)
    return info.value.code(), info.value.details()


def cluster(stub):
    servers = [FakeNode(stub, common_pb2.ROLE_SERVER, f"127.0.0.1:{9000 + i}") for i in range(2)]
    workers = [FakeNode(stub, common_pb2.ROLE_WORKER) for _ in range(2)]
    return servers, workers


def test_job_life_cycle_over_grpc(start):
    _, stub, _ = start()
    servers, workers = cluster(stub)
    assert all(n.incarnation == 1 for n in servers + workers)
    assert workers[0].beat().assignment.job_id == ""

    job_id = stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=SPEC), timeout=DEADLINE).job_id
    assert job_id.startswith("digits-mlp-")
    rank0, rank1 = _ranks(workers, job_id)
    assert servers[0].beat().jobs == []  # no shard map yet

    job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=DEADLINE).job
    assert job.state == common_pb2.JOB_STATE_PENDING and job.reason == "initialising"
    assert "max_steps: 10" in job.spec_yaml and "batch_size: 64" in job.spec_yaml  # normalised

    shard_map = _layout_and_activate(stub, servers, job_id, rank0, rank1)
    for w, loss in ((rank0, 2.0), (rank1, 1.0)):
        reply = w.report(job_id, steps=[pb.StepReport(step=0, loss=loss, samples=32,
                                                      duration_ms=5.0)])
        assert reply.action == pb.WORKER_ACTION_CONTINUE
    reply = rank0.report(job_id, evals=[pb.EvalPoint(step=5, metric="accuracy", value=0.7,
                                                     loss=0.9)])
    assert reply.state == common_pb2.JOB_STATE_RUNNING
    _check_running_job(stub, servers, job_id, rank0, rank1, shard_map)
    _finish_job(stub, servers, job_id, rank0, rank1)


def _ranks(workers, job_id):
    """The two workers' heartbeats carry the new job: (rank 0, rank 1)."""
    by_rank = {}
    for w in workers:
        a = w.beat().assignment
        assert (a.job_id, a.world_size, a.epoch) == (job_id, 2, 1)
        by_rank[a.rank] = w
    return by_rank[0], by_rank[1]


def _layout_and_activate(stub, servers, job_id, rank0, rank1):
    """Only rank 0 sets the layout, and only after it activates; returns the shard map."""
    code, details = abort_of(stub.SetLayout, pb.SetLayoutRequest(
        job_id=job_id, node_id=rank1.node_id, incarnation=1, layout=LAYOUT))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "rank-0" in details
    code, _ = abort_of(stub.ActivateJob, pb.ActivateJobRequest(
        job_id=job_id, node_id=rank0.node_id, incarnation=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # no layout yet
    shard_map = stub.SetLayout(pb.SetLayoutRequest(
        job_id=job_id, node_id=rank0.node_id, incarnation=1, layout=LAYOUT),
        timeout=DEADLINE).shard_map
    assert [(s.offset, s.length) for s in shard_map.shards] == [(0, 32), (32, 32)]
    assert {s.address for s in shard_map.shards} == {"127.0.0.1:9000", "127.0.0.1:9001"}

    state = stub.ActivateJob(pb.ActivateJobRequest(
        job_id=job_id, node_id=rank0.node_id, incarnation=1), timeout=DEADLINE).state
    assert state == common_pb2.JOB_STATE_RUNNING
    view = servers[0].beat().jobs[0]
    assert (view.job_id, view.state, view.epoch) == (job_id, common_pb2.JOB_STATE_RUNNING, 1)
    assert list(view.live_workers) == [rank0.node_id, rank1.node_id]
    return shard_map


def _check_running_job(stub, servers, job_id, rank0, rank1, shard_map):
    """GetJob, ListJobs and ListNodes after one step of each worker and an evaluation."""
    job = stub.GetJob(pb.GetJobRequest(job_id=job_id, include_history=True),
                      timeout=DEADLINE).job
    assert [(p.step, p.loss) for p in job.losses] == [(0, 1.5)]
    assert [(e.step, e.value) for e in job.evals] == [(5, 0.7)]
    assert (job.step, job.max_steps, job.samples, job.epoch) == (5, 10, 64, 1)
    assert (job.metric, job.has_eval, job.best_metric, job.best_step) == ("accuracy", True,
                                                                          0.7, 5)
    assert job.loss == pytest.approx(1.5)
    assert list(job.servers) == [s.server_id for s in shard_map.shards]
    assert job.layout == LAYOUT and job.shard_map == shard_map
    assert [(w.node_id, w.rank, w.alive) for w in job.workers] == [
        (rank0.node_id, 0, True), (rank1.node_id, 1, True)]
    assert job.created_ms > 0 and job.ended_ms == 0
    listed = stub.ListJobs(pb.ListJobsRequest(), timeout=DEADLINE).jobs
    assert [j.job_id for j in listed] == [job_id] and not listed[0].losses

    nodes = {n.node_id: n for n in stub.ListNodes(pb.ListNodesRequest(), timeout=DEADLINE).nodes}
    assert nodes[rank1.node_id].job_id == job_id
    assert list(nodes[servers[0].node_id].jobs) == [job_id]
    assert nodes[servers[0].node_id].state == pb.NODE_STATE_ALIVE


def _finish_job(stub, servers, job_id, rank0, rank1):
    """Rank 0 finishes: the job completes, its workers are released, and it stays final."""
    reply = rank0.report(job_id, evals=[pb.EvalPoint(step=10, metric="accuracy", value=0.8)],
                         finished=True)
    assert (reply.action, reply.state) == (pb.WORKER_ACTION_STOP, common_pb2.JOB_STATE_COMPLETED)
    assert rank1.report(job_id).action == pb.WORKER_ACTION_STOP
    assert rank1.beat().assignment.job_id == ""  # released
    assert servers[1].beat().jobs[0].state == common_pb2.JOB_STATE_COMPLETED  # so it freezes
    job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=DEADLINE).job
    assert job.reason == "reached max_steps (10)" and job.ended_ms >= job.created_ms
    cancelled = stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=DEADLINE)
    assert cancelled.state == common_pb2.JOB_STATE_COMPLETED  # final states never change


def test_listing_more_jobs_than_one_message_could_carry_with_their_specs(start):
    """Pending jobs with the largest specs, more of them than gRPC's message limit holds
    with a spec each: ListJobs, the client's list and `shardps status` (text and JSON) list
    every job; GetJob still has the whole spec."""
    daemon, stub, _ = start()
    big = ("name: big\nmodel: {name: mlp, kwargs: {note: '" + "a" * 62_000 + "'}}\n"
           "data: {dataset: digits}\nstop: {max_steps: 5}\n")
    count = rpc.MAX_MESSAGE_BYTES // 62_000 + 20
    ids = [stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=big), timeout=DEADLINE).job_id
           for _ in range(count)]
    whole = stub.GetJob(pb.GetJobRequest(job_id=ids[0]), timeout=DEADLINE).job.spec_yaml
    assert "a" * 62_000 in whole and count * len(whole) > rpc.MAX_MESSAGE_BYTES

    reply = stub.ListJobs(pb.ListJobsRequest(), timeout=DEADLINE)
    assert [j.job_id for j in reply.jobs] == ids[::-1]  # newest first
    assert not any(j.spec_yaml or j.layout.params for j in reply.jobs)
    assert all(j.state == common_pb2.JOB_STATE_PENDING and j.max_steps == 5 for j in reply.jobs)
    with CoordinatorClient(daemon.address) as client:
        assert len(client.jobs()) == count
    text = run_cli("status", "--coordinator", daemon.address)
    assert text.returncode == 0, text.stderr
    assert sum(line.startswith("big-") for line in text.stdout.splitlines()) == count
    listed = run_cli("status", "--coordinator", daemon.address, "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(j["job_id"] for j in json.loads(listed.stdout)) == sorted(ids)


def test_cancel_and_unknown_ids(start):
    _, stub, _ = start()
    job_id = stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=SPEC), timeout=DEADLINE).job_id
    job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=DEADLINE).job
    assert job.reason == "waiting for 2 servers and 2 workers (have 0, 0)"
    state = stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=DEADLINE).state
    assert state == common_pb2.JOB_STATE_CANCELLED
    code, details = abort_of(stub.GetJob, pb.GetJobRequest(job_id="nope-000000"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope-000000" in details
    code, _ = abort_of(stub.CancelJob, pb.CancelJobRequest(job_id="nope-000000"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = abort_of(stub.ActivateJob, pb.ActivateJobRequest(
        job_id=job_id, node_id="worker-abcdef", incarnation=1))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = abort_of(stub.RegisterNode, pb.RegisterNodeRequest(role=common_pb2.ROLE_SERVER))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "address" in details
    reply = stub.Heartbeat(pb.HeartbeatRequest(node_id="worker-abcdef", incarnation=1),
                           timeout=DEADLINE)
    assert reply.unknown_node and reply.lease_ms == 5000


@pytest.mark.parametrize("text, key", [
    (SPEC + "colour: blue\n", "colour"),
    (SPEC + "optimizer: {lr: -1}\n", "optimizer.lr"),
    (SPEC.replace("name: mlp", "name: resnet9000"), "model.name"),
])
def test_bad_specs_are_invalid_argument_and_store_nothing(start, text, key):
    _, stub, _ = start()
    code, details = abort_of(stub.SubmitJob, pb.SubmitJobRequest(spec_yaml=text))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(key)
    assert stub.ListJobs(pb.ListJobsRequest(), timeout=DEADLINE).jobs == []


def test_expired_worker_is_dead_and_its_job_rerank(start):
    # 500 ms leaves the survivors, heartbeating every 50 ms, room on a busy machine.
    _, stub, _ = start(lease_ms=500)
    servers, workers = cluster(stub)
    job_id = stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=SPEC), timeout=DEADLINE).job_id
    ranks = {w.beat().assignment.rank: w for w in workers}
    survivor, lost = ranks[1], ranks[0]

    def survivor_promoted():
        for server in servers:
            server.beat()
        assignment = survivor.beat().assignment
        return assignment if assignment.world_size == 1 else None

    assignment = poll(survivor_promoted, timeout=10, interval=0.05, what="lease expiry")
    assert (assignment.job_id, assignment.rank, assignment.world_size, assignment.epoch) == (
        job_id, 0, 1, 2)
    nodes = {n.node_id: n for n in stub.ListNodes(pb.ListNodesRequest(), timeout=DEADLINE).nodes}
    assert nodes[lost.node_id].state == pb.NODE_STATE_DEAD
    assert nodes[lost.node_id].last_seen_ms_ago >= 500
    assert nodes[lost.node_id].job_id == ""
    assert lost.beat().unknown_node
    again = FakeNode(stub, common_pb2.ROLE_WORKER)  # a new process: a new id
    assert again.node_id != lost.node_id
    reply = stub.RegisterNode(pb.RegisterNodeRequest(
        role=common_pb2.ROLE_WORKER, node_id=lost.node_id), timeout=DEADLINE)
    assert (reply.node_id, reply.incarnation, reply.lease_ms) == (lost.node_id, 2, 500)


def test_sweeper_expires_leases_without_any_rpc(start):
    daemon, stub, _ = start(lease_ms=300)
    node = FakeNode(stub, common_pb2.ROLE_WORKER)

    def dead_metric():
        text = scrape(daemon.metrics_address)
        return 'shardps_coordinator_lease_expiries_total{role="worker"} 1.0' in text

    poll(dead_metric, timeout=10, interval=0.1, what="sweeper expiry")
    assert node.beat().unknown_node


def test_shutting_down_heartbeat_releases_the_worker_at_once(start):
    _, stub, _ = start()
    _, workers = cluster(stub)
    stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=SPEC), timeout=DEADLINE)
    workers[0].beat()
    assert not workers[1].beat(shutting_down=True).unknown_node
    assignment = workers[0].beat().assignment
    assert (assignment.rank, assignment.world_size, assignment.epoch) == (0, 1, 2)


# -- long-polls -------------------------------------------------------------------------------
# A 60 s lease lets the coordinator hold a call up to 30 s: far longer than any of these tests
# take, so a call that returns did so because of what the test did, not because its hold ran out.
LONG_LEASE_MS = 60_000
HOLD_MS = 30_000
HELD_DEADLINE = HOLD_MS / 1000 + DEADLINE


def held_heartbeat(node):
    return node.stub.Heartbeat.future(pb.HeartbeatRequest(
        node_id=node.node_id, incarnation=node.incarnation, wait_for_assignment_ms=HOLD_MS),
        timeout=HELD_DEADLINE)


def wait_held(daemon, count):
    poll(lambda: f"shardps_coordinator_held_calls {count:.1f}" in scrape(daemon.metrics_address), timeout=30,
         interval=0.02, what=f"{count} held call(s)")


def test_an_idle_workers_held_heartbeat_returns_its_assignment_when_a_job_is_submitted(start):
    daemon, stub, _ = start(lease_ms=LONG_LEASE_MS)
    _, workers = cluster(stub)
    held = held_heartbeat(workers[0])
    wait_held(daemon, 1)
    assert not held.done()
    job_id = stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=SPEC), timeout=DEADLINE).job_id
    assignment = held.result().assignment
    assert (assignment.job_id, assignment.world_size) == (job_id, 2)
    text = scrape(daemon.metrics_address)
    assert 'shardps_coordinator_long_polls_total{call="heartbeat",outcome="woken"} 1.0' in text
    # A worker that already has its assignment is answered at once, as by a plain heartbeat.
    again = stub.Heartbeat(pb.HeartbeatRequest(
        node_id=workers[1].node_id, incarnation=1, wait_for_assignment_ms=HOLD_MS),
        timeout=HELD_DEADLINE)
    assert (again.assignment.job_id, again.assignment.rank) == (job_id, 1 - assignment.rank)


def test_a_held_getjob_returns_when_the_job_starts_running(start):
    daemon, stub, _ = start(lease_ms=LONG_LEASE_MS)
    _, workers = cluster(stub)
    job_id = stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=SPEC), timeout=DEADLINE).job_id
    rank0 = next(w for w in workers if w.beat().assignment.rank == 0)
    held = stub.GetJob.future(pb.GetJobRequest(
        job_id=job_id, wait_ms=HOLD_MS, wait_while_state=common_pb2.JOB_STATE_PENDING),
        timeout=HELD_DEADLINE)
    wait_held(daemon, 1)
    stub.SetLayout(pb.SetLayoutRequest(job_id=job_id, node_id=rank0.node_id, incarnation=1,
                                       layout=LAYOUT), timeout=DEADLINE)
    assert not held.done()  # still PENDING: the layout alone does not end the wait
    stub.ActivateJob(pb.ActivateJobRequest(job_id=job_id, node_id=rank0.node_id, incarnation=1),
                     timeout=DEADLINE)
    job = held.result().job
    assert job.state == common_pb2.JOB_STATE_RUNNING and job.layout == LAYOUT


def test_long_polls_beyond_the_limit_are_answered_at_once_and_cancelled_ones_let_go(start):
    daemon, stub, _ = start(lease_ms=LONG_LEASE_MS, max_held_calls=1)
    _, workers = cluster(stub)
    held = held_heartbeat(workers[0])
    wait_held(daemon, 1)
    reply = held_heartbeat(workers[1]).result()  # over the limit: not held
    assert reply.assignment.job_id == "" and not reply.unknown_node
    assert not held.done()
    text = scrape(daemon.metrics_address)
    assert 'shardps_coordinator_long_polls_total{call="heartbeat",outcome="over_limit"} 1.0' in text
    held.cancel()
    wait_held(daemon, 0)


def test_a_stopping_coordinator_answers_held_calls(start):
    daemon, stub, _ = start(lease_ms=LONG_LEASE_MS)
    _, workers = cluster(stub)
    held = held_heartbeat(workers[0])
    wait_held(daemon, 1)
    daemon.stop(grace=HOLD_MS / 2000)  # unanswered, the held call would be cut at the grace
    reply = held.result()
    assert reply.assignment.job_id == "" and not reply.unknown_node


@pytest.mark.parametrize("request_", [
    pb.GetJobRequest(wait_ms=-1, wait_while_state=common_pb2.JOB_STATE_PENDING),
    pb.GetJobRequest(wait_ms=100),
], ids=["negative wait", "wait without a state"])
def test_bad_getjob_waits_are_invalid_argument(start, request_):
    _, stub, _ = start()
    request_.job_id = stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=SPEC), timeout=DEADLINE).job_id
    code, details = abort_of(stub.GetJob, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "wait" in details


def test_a_negative_heartbeat_wait_is_invalid_argument(start):
    _, stub, _ = start()
    node = FakeNode(stub, common_pb2.ROLE_WORKER)
    code, details = abort_of(stub.Heartbeat, pb.HeartbeatRequest(
        node_id=node.node_id, incarnation=1, wait_for_assignment_ms=-5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "wait_for_assignment_ms" in details


def test_health_is_serving(start):
    _, _, channel = start()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "shardps.v1.Coordinator"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_endpoint_serves_the_coordinator_metrics(start):
    daemon, stub, _ = start()
    servers, workers = cluster(stub)
    job_id = stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=SPEC), timeout=DEADLINE).job_id
    abort_of(stub.SubmitJob, pb.SubmitJobRequest(spec_yaml="model: {name: mlp}\n"))
    text = scrape(daemon.metrics_address)
    for line in (
        'shardps_coordinator_nodes{role="server",state="alive"} 2.0',
        'shardps_coordinator_nodes{role="worker",state="dead"} 0.0',
        'shardps_coordinator_lease_expiries_total{role="server"} 0.0',
        'shardps_coordinator_jobs{state="pending"} 1.0',
        "shardps_coordinator_jobs_submitted_total 1.0",
        "shardps_coordinator_rejected_specs_total 1.0",
        f'shardps_coordinator_job_step{{job="{job_id}"}} 0.0',
        f'shardps_coordinator_job_loss{{job="{job_id}"}} 0.0',
        f'shardps_coordinator_job_steps_per_second{{job="{job_id}"}} 0.0',
        "# TYPE shardps_coordinator_job_best_metric gauge",
    ):
        assert line in text, line


def test_main_exits_bind_failed_on_a_taken_port(start, tmp_path, capsys):
    daemon, _, _ = start()
    state_dir = tmp_path / "state"
    with pytest.raises(SystemExit) as exit_info:
        main(["--port", str(daemon.port), "--state-dir", str(state_dir)])
    assert exit_info.value.code == exitcodes.BIND_FAILED
    assert state_dir.is_dir()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot bind") and "\n" not in err
