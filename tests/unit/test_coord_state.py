"""The coordinator's persistent state and recovery rules: the state file round trip, a
restarted servicer carrying on, sync rollbacks, elastic rejoin and resumed jobs."""

import grpc
import msgpack
import pytest

from shardps.proto import common_pb2
from shardps.proto import coordinator_pb2 as pb
from shardps.proto.layout import make_layout
from shardps.server.coordinator.history import Evaluation, StepReport
from shardps.server.coordinator.jobs import (
    COMPLETED,
    RUNNING,
    JobStateError,
    JobTable,
    UnknownJobError,
)
from shardps.server.coordinator.membership import Membership
from shardps.server.coordinator.recovery import Rollback, progress_reported, shard_restored
from shardps.server.coordinator.servicer import CoordinatorServicer
from shardps.server.coordinator.state import StateError, StateFile, dump, restore, structure

SERVER, WORKER = common_pb2.ROLE_SERVER, common_pb2.ROLE_WORKER
LAYOUT = make_layout([("w", (4, 3)), ("b", (3,))])


def spec(mode="sync", workers=2, servers=2, name="job"):
    return (f"name: {name}\nmodel: {{name: mlp}}\ndata: {{dataset: digits}}\n"
            f"consistency: {{mode: {mode}}}\ncluster: {{servers: {servers}, workers: {workers}}}\n"
            "stop: {max_steps: 100, target: {metric: accuracy, value: 0.9}, patience: 3}\n")


@pytest.fixture
def cluster():
    m = Membership(lease_ms=10_000)
    for i in (1, 2):
        m.register(SERVER, f"h:{i}", now=0.0, node_id=f"server-00000{i}",
                   stored=[("old-job", i - 1)])
    for i in (1, 2, 3):
        m.register(WORKER, "", now=0.0, node_id=f"worker-00000{i}")
    return m


def running(cluster, table, text=None, now=1.0):
    job = table.submit(text or spec(), cluster, now)
    table.set_layout(job.job_id, job.workers[0], 1, LAYOUT, cluster, now)
    table.activate(job.job_id, job.workers[0], 1, cluster, now)
    return job


def steps(*pairs):
    return [StepReport(step, loss, 32) for step, loss in pairs]


# -- the state file -------------------------------------------------------------------------

def test_dump_and_restore_round_trip_everything_status_shows(cluster, tmp_path):
    table = JobTable()
    job = running(cluster, table)
    a, b = job.workers
    table.report_progress(job.job_id, a, 1, cluster, 2.0, steps=steps((0, 2.0), (1, 1.5)),
                          evals=[Evaluation(1, "accuracy", 0.5, 1.4)])
    table.report_progress(job.job_id, b, 1, cluster, 2.0, steps=steps((0, 1.0)))
    table.shard_restored(job.job_id, 1, 0, 1)
    done = table.submit(spec(workers=1, name="done"), cluster, 3.0)
    table.cancel(done.job_id, 4.0)
    for node in (b, *job.servers):
        cluster.heartbeat(node, 1, now=15.0)
    cluster.expire(20.0)  # the others are dead ...
    cluster.register(WORKER, "", now=20.0, node_id="worker-000003")  # ... one came back

    file = StateFile(tmp_path)
    file.save(dump(cluster, table, now=20.0, wall=1000.0))
    m2, t2 = Membership(lease_ms=10_000), JobTable()
    restore(file.load(), m2, t2, now=500.0, wall=1010.0)

    assert structure(m2, t2) == structure(cluster, table)
    again = t2.get(job.job_id)
    assert (again.state, again.epoch, again.workers, again.servers) == (
        RUNNING, job.epoch, job.workers, job.servers)
    assert again.layout == LAYOUT and again.shard_map == job.shard_map
    assert list(again.history.losses) == list(job.history.losses) == [(0, 1.5)]
    assert again.history.workers[a].step == 1 and again.history.samples == 96
    assert [e.value for e in again.history.evals] == [0.5]
    assert (again.tracker.best, again.tracker.latest) == (0.5, 0.5)
    assert (again.rollback.id, again.rollback.version) == (1, 0)
    assert again.created == pytest.approx(500.0 - (1010.0 - (1000.0 - 19.0)))  # same unix time
    # The open step 1 (b has not reported it) still closes once b does.
    t2.report_progress(job.job_id, b, 1, m2, 501.0, steps=steps((1, 0.5)))
    assert list(again.history.losses) == [(0, 1.5), (1, 1.0)]
    assert t2.get(done.job_id).state == common_pb2.JOB_STATE_CANCELLED
    assert [j.job_id for j in t2.jobs()] == [j.job_id for j in table.jobs()]
    # Nodes keep their incarnations; the alive one has a fresh lease, the dead stay dead.
    assert m2.heartbeat("worker-000003", 2, now=505.0)
    assert not m2.heartbeat(a, 1, now=505.0)
    assert m2.get("server-000001").stored == [("old-job", 0)]


def test_a_corrupt_state_file_is_refused(tmp_path):
    file = StateFile(tmp_path)
    file.save({"format": 1, "nodes": [], "jobs": []})
    data = bytearray(file.path.read_bytes())
    data[-3] ^= 0xFF
    file.path.write_bytes(bytes(data))
    with pytest.raises(StateError):
        file.load()
    file.path.write_bytes(msgpack.packb({"body": b"x", "sha256": "0"}))
    with pytest.raises(StateError, match="checksum"):
        file.load()
    assert StateFile(tmp_path / "empty").load() is None


class Ctx:
    def abort(self, code, details):
        raise AssertionError(f"{code}: {details}")


def test_a_restarted_servicer_carries_on_with_the_same_nodes_and_jobs(tmp_path):
    first = CoordinatorServicer(lease_ms=10_000, state_dir=str(tmp_path))
    ids = [first.RegisterNode(pb.RegisterNodeRequest(role=SERVER, address="h:1"), Ctx()),
           first.RegisterNode(pb.RegisterNodeRequest(role=WORKER), Ctx())]
    job_id = first.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec(workers=1, servers=1)),
                             Ctx()).job_id
    assert first.Heartbeat(pb.HeartbeatRequest(node_id=ids[1].node_id, incarnation=1),
                           Ctx()).assignment.job_id == job_id
    # No shutdown: the state is on disk already (a SIGKILL loses nothing).
    second = CoordinatorServicer(lease_ms=10_000, state_dir=str(tmp_path))
    assert [j.job_id for j in second.ListJobs(pb.ListJobsRequest(), Ctx()).jobs] == [job_id]
    for reply in ids:  # the same incarnations heartbeat on without registering again
        beat = second.Heartbeat(pb.HeartbeatRequest(node_id=reply.node_id, incarnation=1), Ctx())
        assert not beat.unknown_node
    assert beat.assignment.job_id == job_id
    again = second.RegisterNode(pb.RegisterNodeRequest(
        role=SERVER, address="h:9", node_id=ids[0].node_id), Ctx())
    assert (again.node_id, again.incarnation) == (ids[0].node_id, 2)


def test_the_state_is_written_outside_the_lock_and_before_the_reply(tmp_path, monkeypatch):
    """A slow write (fsync) must not hold up heartbeats: the servicer's lock is free while
    the state is written, and the RPC that changed it replies only once it is on disk."""
    servicer = CoordinatorServicer(lease_ms=10_000, state_dir=str(tmp_path))
    locked = []
    real = StateFile.save

    def save(self, doc):
        locked.append(servicer._lock.locked())
        return real(self, doc)

    monkeypatch.setattr(StateFile, "save", save)
    node = servicer.RegisterNode(pb.RegisterNodeRequest(role=SERVER, address="h:1"), Ctx())
    assert locked == [False]
    assert [n["node_id"] for n in StateFile(tmp_path).load()["nodes"]] == [node.node_id]
    servicer.Heartbeat(pb.HeartbeatRequest(node_id=node.node_id, incarnation=1), Ctx())
    assert locked == [False]  # a heartbeat changes no structure: nothing to write


# -- rollbacks ------------------------------------------------------------------------------

def test_rollback_rules():
    rb = Rollback()
    assert not shard_restored(rb, "async", True, 40)
    assert not shard_restored(rb, "sync", False, 40)  # not running: nothing to roll back
    assert shard_restored(rb, "sync", True, 40) and (rb.id, rb.version) == (1, 40)
    assert not shard_restored(rb, "sync", True, 60)  # part of rollback 1: goes down to 40
    assert shard_restored(rb, "sync", True, 20) and (rb.id, rb.version) == (2, 20)
    assert not progress_reported(rb, 1, [25])  # from before rollback 2
    assert not progress_reported(rb, 2, [19])
    assert progress_reported(rb, 2, [20]) and rb.settled
    assert shard_restored(rb, "sync", True, 80) and (rb.id, rb.version) == (3, 80)  # a new crash


def test_servers_and_workers_see_the_rollback_and_incarnations(tmp_path):
    servicer = CoordinatorServicer(lease_ms=10_000)
    server = servicer.RegisterNode(pb.RegisterNodeRequest(role=SERVER, address="h:1"), Ctx())
    worker = servicer.RegisterNode(pb.RegisterNodeRequest(role=WORKER), Ctx())
    job_id = servicer.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec(workers=1, servers=1)),
                                Ctx()).job_id
    servicer.Heartbeat(pb.HeartbeatRequest(node_id=worker.node_id, incarnation=1), Ctx())
    servicer.SetLayout(pb.SetLayoutRequest(job_id=job_id, node_id=worker.node_id, incarnation=1,
                                           layout=LAYOUT), Ctx())
    servicer.ActivateJob(pb.ActivateJobRequest(job_id=job_id, node_id=worker.node_id,
                                               incarnation=1), Ctx())
    # The server restarts and reports its restore at registration: the reply's view already
    # carries the rollback, so it never rolls back its own restored shard.
    again = servicer.RegisterNode(pb.RegisterNodeRequest(
        role=SERVER, address="h:2", node_id=server.node_id,
        restored=[pb.ShardVersion(job_id=job_id, shard_index=0, version=40, lost_updates=7)]),
        Ctx())
    [view] = again.jobs
    assert (view.rollback_id, view.rollback_version) == (1, 40)
    assert (list(view.live_workers), list(view.live_incarnations)) == ([worker.node_id], [1])
    beat = servicer.Heartbeat(pb.HeartbeatRequest(node_id=worker.node_id, incarnation=1), Ctx())
    assert (beat.assignment.rollback_id, beat.assignment.rollback_version) == (1, 40)
    info = servicer.GetJob(pb.GetJobRequest(job_id=job_id), Ctx()).job
    assert (info.rollback_id, info.rollback_version) == (1, 40)
    assert info.shard_map.shards[0].address == "h:2"


# -- elastic rejoin and resume --------------------------------------------------------------

def test_a_running_job_takes_an_idle_worker_back_at_the_end(cluster):
    table = JobTable()
    job = running(cluster, table)
    a, b = job.workers
    cluster.heartbeat(a, 1, now=2.0, shutting_down=True)  # a is dead
    table.node_lost(a, 2.0, "shut down")
    assert job.workers == [b] and job.epoch == 2
    table.schedule(cluster, 3.0)  # worker-000003 is idle
    assert job.workers == [b, "worker-000003"] and job.epoch == 3
    node = cluster.register(WORKER, "", now=4.0, node_id=a)  # a comes back: incarnation 2
    table.node_registered(node, 4.0)
    table.schedule(cluster, 4.0)
    assert job.workers == [b, "worker-000003"]  # full again: a stays idle


def test_resume_needs_an_ended_job_and_its_servers(cluster):
    table = JobTable()
    with pytest.raises(UnknownJobError, match="no server reports"):
        table.submit(spec(), cluster, 1.0, resume_from="nope")
    with pytest.raises(ValueError, match="cluster.servers: must be 2"):
        table.submit(spec(servers=1), cluster, 1.0, resume_from="old-job")
    job = table.submit(spec(workers=1), cluster, 1.0, resume_from="old-job")
    assert job.servers == ["server-000001", "server-000002"]  # shard i where shard i is
    assert job.resume_from == "old-job"
    other = running(cluster, JobTable())
    with pytest.raises(JobStateError, match="still RUNNING"):
        table2 = JobTable()
        table2.load([other])
        table2.submit(spec(), cluster, 2.0, resume_from=other.job_id)


def test_a_resumed_job_waits_for_the_server_holding_its_shard(cluster):
    table = JobTable()
    first = running(cluster, table, spec(workers=1))
    table.report_progress(first.job_id, first.workers[0], 1, cluster, 2.0, finished=True)
    assert first.state == COMPLETED
    cluster.expire(20.0)  # every node dead
    cluster.register(SERVER, "h:3", now=20.0, node_id="server-000003")
    cluster.register(WORKER, "", now=20.0, node_id="worker-000001")
    job = table.submit(spec(workers=1), cluster, 20.0, resume_from=first.job_id)
    assert not job.servers and "checkpoint shard 0" in job.reason
    for server in first.servers:
        cluster.register(SERVER, "h:x", now=21.0, node_id=server)
    table.schedule(cluster, 21.0)
    assert job.servers == first.servers


# -- hostile input (issue 10) ---------------------------------------------------------------

class Refused(Exception):
    pass


class Aborting:
    def abort(self, code, details):
        raise Refused(code, details)


def test_a_spec_is_parsed_before_the_lock_is_taken(monkeypatch):
    servicer = CoordinatorServicer(lease_ms=10_000)
    seen = []

    def normalise(text):
        seen.append(servicer._lock.locked())
        return real(text)

    from shardps.server.coordinator import servicer as servicer_module
    real = servicer_module.normalise
    monkeypatch.setattr(servicer_module, "normalise", normalise)
    servicer.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec(workers=1, servers=1)), Ctx())
    with pytest.raises(Refused) as info:
        servicer.SubmitJob(pb.SubmitJobRequest(spec_yaml="a: &x 1\n"), Aborting())
    assert info.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert seen == [False, False]
    assert len(servicer.ListJobs(pb.ListJobsRequest(), Ctx()).jobs) == 1


def test_reports_cannot_make_a_job_unlistable_nor_its_reason_huge():
    servicer = CoordinatorServicer(lease_ms=10_000)
    server = servicer.RegisterNode(pb.RegisterNodeRequest(role=SERVER, address="h:1"), Ctx())
    worker = servicer.RegisterNode(pb.RegisterNodeRequest(role=WORKER), Ctx())
    job_id = servicer.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec(workers=1, servers=1)), Ctx()).job_id
    assert server.node_id and worker.node_id
    servicer.SetLayout(pb.SetLayoutRequest(job_id=job_id, node_id=worker.node_id, incarnation=1,
                                           layout=LAYOUT), Ctx())
    servicer.ActivateJob(pb.ActivateJobRequest(job_id=job_id, node_id=worker.node_id, incarnation=1), Ctx())
    big = 2**63 - 1  # each fits int64; their sum does not
    servicer.ReportProgress(pb.ReportProgressRequest(
        job_id=job_id, node_id=worker.node_id, incarnation=1,
        steps=[pb.StepReport(step=0, loss=1.0, samples=big), pb.StepReport(step=1, loss=1.0, samples=big)]),
        Ctx())
    (info,) = servicer.ListJobs(pb.ListJobsRequest(), Ctx()).jobs
    assert info.samples == 2**63 - 1
    servicer.ReportProgress(pb.ReportProgressRequest(
        job_id=job_id, node_id=worker.node_id, incarnation=1, failure="x" * 1_000_000), Ctx())
    (info,) = servicer.ListJobs(pb.ListJobsRequest(), Ctx()).jobs
    assert info.state == common_pb2.JOB_STATE_FAILED and len(info.reason) < 2200


def test_node_text_is_bounded_and_errors_do_not_echo_whole_values():
    servicer = CoordinatorServicer(lease_ms=10_000)
    with pytest.raises(Refused) as info:
        servicer.RegisterNode(pb.RegisterNodeRequest(role=WORKER, hostname="h" * 100_000), Aborting())
    assert info.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT and "hostname" in info.value.args[1]
    assert servicer.ListNodes(pb.ListNodesRequest(), Ctx()).nodes == []
    with pytest.raises(Refused) as info:
        servicer.GetJob(pb.GetJobRequest(job_id="j" * 100_000), Aborting())
    assert info.value.args[0] == grpc.StatusCode.NOT_FOUND and len(info.value.args[1]) <= 1024


def test_restore_clamps_stored_numbers_and_leaves_out_specs_refused_otherwise(cluster, caplog):
    table = JobTable()
    big = table.submit(spec(name="big"), cluster, 1.0)
    odd = table.submit(spec(name="odd"), cluster, 1.0)
    doc = dump(cluster, table, now=2.0, wall=1000.0)
    doc["jobs"][0]["spec_yaml"] = doc["jobs"][0]["spec_yaml"].replace("max_steps: 100", f"max_steps: {10**30}")
    doc["jobs"][1]["spec_yaml"] = doc["jobs"][1]["spec_yaml"].replace("kwargs: {}", "kwargs: &a {}", 1)
    m2, t2 = Membership(lease_ms=10_000), JobTable()
    restore(doc, m2, t2, now=5.0, wall=1003.0)
    assert [j.job_id for j in t2.jobs()] == [big.job_id]
    again = t2.get(big.job_id)
    assert again.spec["stop"]["max_steps"] == 2**31 - 1 and f"max_steps: {2**31 - 1}" in again.spec_yaml
    assert f"{odd.job_id} left out of the restored state" in caplog.text
    assert "stop.max_steps: 1000000000000000000000000000000 clamped to 2147483647" in caplog.text
