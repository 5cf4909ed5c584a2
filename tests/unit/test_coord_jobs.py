"""The job table: scheduling, the state machine, progress aggregation and membership changes,
all with an injected clock."""

import math

import pytest

from shardps.proto import common_pb2
from shardps.proto.layout import make_layout
from shardps.proto.spec import SpecError
from shardps.server.coordinator.history import Evaluation, StepReport
from shardps.server.coordinator.jobs import (
    CANCELLED,
    COMPLETED,
    CONVERGED,
    FAILED,
    PENDING,
    RUNNING,
    JobStateError,
    JobTable,
    UnknownJobError,
)
from shardps.server.coordinator.membership import Membership, StaleNodeError, UnknownNodeError

SERVER, WORKER = common_pb2.ROLE_SERVER, common_pb2.ROLE_WORKER
LAYOUT = make_layout([("w", (4, 3)), ("b", (3,))])  # 15 elements


def spec(servers=2, workers=2, stop="{max_steps: 10}", name="job"):
    return (f"name: {name}\nmodel: {{name: mlp}}\ndata: {{dataset: digits}}\n"
            f"cluster: {{servers: {servers}, workers: {workers}}}\nstop: {stop}\n")


@pytest.fixture
def cluster():
    """2 servers and 3 workers with known ids, registered at t=0 with a 10 s lease."""
    m = Membership(lease_ms=10_000)
    for i in (1, 2):
        m.register(SERVER, f"h:{i}", now=0.0, node_id=f"server-00000{i}")
    for i in (1, 2, 3):
        m.register(WORKER, "", now=0.0, node_id=f"worker-00000{i}")
    return m


def running_job(cluster, table, text=None, now=1.0):
    job = table.submit(text or spec(), cluster, now)
    table.set_layout(job.job_id, job.workers[0], 1, LAYOUT, cluster, now)
    table.activate(job.job_id, job.workers[0], 1, cluster, now)
    return job


def renew(membership, now):
    """Heartbeats every alive node, so that only the behaviour under test expires."""
    for node in membership.alive():
        membership.heartbeat(node.node_id, node.incarnation, now)


def steps(*pairs, samples=32):
    return [StepReport(step, loss, samples) for step, loss in pairs]


# -- submit and scheduling -------------------------------------------------------------------

def test_invalid_spec_raises_and_stores_nothing(cluster):
    table = JobTable()
    with pytest.raises(SpecError, match="optimizer.lr"):
        table.submit(spec() + "optimizer: {lr: -1}\n", cluster, 0.0)
    assert table.jobs() == []


def test_job_waits_with_reason_until_nodes_exist():
    m = Membership(lease_ms=10_000)
    table = JobTable()
    job = table.submit(spec(servers=1, workers=2, name="digits"), m, 0.0)
    assert job.job_id.startswith("digits-") and len(job.job_id) == len("digits-") + 6
    assert job.state == PENDING
    assert job.reason == "waiting for 1 servers and 2 workers (have 0, 0)"
    m.register(SERVER, "h:1", now=1.0)
    m.register(WORKER, "", now=1.0, node_id="worker-00000b")
    assert table.schedule(m, 1.0) == []
    assert job.reason == "waiting for 1 servers and 2 workers (have 1, 1)"
    m.register(WORKER, "", now=1.0, node_id="worker-00000a")
    assert table.schedule(m, 2.0) == [job]
    assert job.reason == "initialising" and job.epoch == 1
    assert job.workers == ["worker-00000a", "worker-00000b"]  # ranks follow id order


def test_servers_with_fewest_jobs_first_and_workers_one_job_at_a_time(cluster):
    table = JobTable()
    first = table.submit(spec(servers=1, workers=2), cluster, 0.0)
    assert first.servers == ["server-000001"]
    assert first.workers == ["worker-000001", "worker-000002"]
    second = table.submit(spec(servers=1, workers=1), cluster, 1.0)
    assert second.servers == ["server-000002"]  # server-000001 already hosts a job
    assert second.workers == ["worker-000003"]
    third = table.submit(spec(servers=2, workers=1), cluster, 2.0)
    assert third.state == PENDING and not third.servers
    assert third.reason.endswith("(have 2, 0)")
    assert table.assignment("worker-000003") is second


def test_a_later_smaller_job_may_start_while_a_big_one_waits(cluster):
    table = JobTable()
    big = table.submit(spec(workers=4), cluster, 0.0)
    small = table.submit(spec(workers=1), cluster, 1.0)
    assert not big.servers and small.workers == ["worker-000001"]
    assert [j.job_id for j in table.jobs()] == [small.job_id, big.job_id]  # newest first


def test_final_job_releases_its_workers_to_the_next_job(cluster):
    table = JobTable()
    first = table.submit(spec(workers=3), cluster, 0.0)
    second = table.submit(spec(workers=2), cluster, 1.0)
    assert not second.workers
    table.cancel(first.job_id, 2.0)
    assert table.assignment("worker-000001") is None
    table.schedule(cluster, 3.0)
    assert second.workers == ["worker-000001", "worker-000002"]


# -- layout and activation -------------------------------------------------------------------

def test_set_layout_builds_the_shard_map_once(cluster):
    table = JobTable()
    job = table.submit(spec(), cluster, 0.0)
    shard_map = table.set_layout(job.job_id, "worker-000001", 1, LAYOUT, cluster, 1.0)
    assert [(s.server_id, s.address, s.offset, s.length) for s in shard_map.shards] == [
        ("server-000001", "h:1", 0, 8), ("server-000002", "h:2", 8, 7)]
    again = table.set_layout(job.job_id, "worker-000001", 1, LAYOUT, cluster, 2.0)
    assert again == shard_map
    other = make_layout([("w", (5,))])
    with pytest.raises(JobStateError, match="already has layout"):
        table.set_layout(job.job_id, "worker-000001", 1, other, cluster, 3.0)
    assert job.layout == LAYOUT


def test_set_layout_refuses_wrong_callers_and_bad_layouts(cluster):
    table = JobTable()
    job = table.submit(spec(), cluster, 0.0)
    with pytest.raises(JobStateError, match="rank-0"):
        table.set_layout(job.job_id, "worker-000002", 1, LAYOUT, cluster, 1.0)
    with pytest.raises(StaleNodeError):
        table.set_layout(job.job_id, "worker-000001", 2, LAYOUT, cluster, 1.0)
    with pytest.raises(UnknownNodeError):
        table.set_layout(job.job_id, "worker-999999", 1, LAYOUT, cluster, 1.0)
    with pytest.raises(UnknownJobError):
        table.set_layout("nope-000000", "worker-000001", 1, LAYOUT, cluster, 1.0)
    broken = make_layout([("w", (4, 3))])
    broken.fingerprint = "0" * 16
    with pytest.raises(ValueError, match="fingerprint"):
        table.set_layout(job.job_id, "worker-000001", 1, broken, cluster, 1.0)
    with pytest.raises(ValueError, match="cannot be split"):
        table.set_layout(job.job_id, "worker-000001", 1, make_layout([("w", (1,))]), cluster, 1.0)
    assert job.layout is None and job.shard_map is None


def test_activate_needs_a_layout_and_repeats_harmlessly(cluster):
    table = JobTable()
    job = table.submit(spec(), cluster, 0.0)
    with pytest.raises(JobStateError, match="SetLayout"):
        table.activate(job.job_id, "worker-000001", 1, cluster, 1.0)
    table.set_layout(job.job_id, "worker-000001", 1, LAYOUT, cluster, 1.0)
    with pytest.raises(JobStateError, match="rank-0"):
        table.activate(job.job_id, "worker-000002", 1, cluster, 1.0)
    assert table.activate(job.job_id, "worker-000001", 1, cluster, 1.0) == RUNNING
    assert table.activate(job.job_id, "worker-000001", 1, cluster, 2.0) == RUNNING


def test_unassigned_job_cannot_take_a_layout():
    m = Membership(lease_ms=10_000)
    m.register(WORKER, "", now=0.0, node_id="worker-000001")
    table = JobTable()
    job = table.submit(spec(), m, 0.0)
    with pytest.raises(JobStateError, match="no nodes"):
        table.set_layout(job.job_id, "worker-000001", 1, LAYOUT, m, 1.0)


def test_init_timeout_fails_the_job(cluster):
    table = JobTable(init_timeout_s=120.0)
    job = table.submit(spec(), cluster, 10.0)
    renew(cluster, 130.0)
    table.sweep(cluster, 130.0)
    assert job.state == PENDING
    renew(cluster, 130.5)
    table.sweep(cluster, 130.5)
    assert (job.state, job.reason) == (FAILED, "initialisation timed out")
    assert table.assignment("worker-000001") is None


# -- progress, verdicts, final states --------------------------------------------------------

def test_step_loss_is_the_batch_weighted_mean_once_every_worker_reported(cluster):
    table = JobTable()
    job = running_job(cluster, table)
    a, b = job.workers
    table.report_progress(job.job_id, a, 1, cluster, 2.0,
                          steps=[StepReport(0, 1.0, 30), StepReport(1, 0.5, 30)])
    assert list(job.history.losses) == []  # b has not reported step 0 yet
    table.report_progress(job.job_id, b, 1, cluster, 2.5, steps=[StepReport(0, 2.0, 10)])
    assert list(job.history.losses) == [(0, 1.25)]
    table.report_progress(job.job_id, b, 1, cluster, 3.0,
                          steps=[StepReport(0, 9.0, 10), StepReport(1, 1.5, 10)])  # 0: resent
    assert list(job.history.losses) == [(0, 1.25), (1, 0.75)]
    assert job.history.samples == 80 and job.history.step == 1
    assert job.history.latest_loss(job.workers) == pytest.approx(0.75)


def test_loss_history_keeps_the_newest_points(cluster):
    table = JobTable(max_points=3)
    job = running_job(cluster, table, spec(workers=1))
    w = job.workers[0]
    table.report_progress(job.job_id, w, 1, cluster, 2.0, steps=steps(*[(s, s) for s in range(5)]))
    assert [s for s, _ in job.history.losses] == [2, 3, 4]


def test_steps_per_second_over_the_recent_window(cluster):
    table = JobTable()
    job = running_job(cluster, table, spec(workers=1))
    w = job.workers[0]
    table.report_progress(job.job_id, w, 1, cluster, 10.0, steps=steps((0, 1.0)))
    table.report_progress(job.job_id, w, 1, cluster, 12.0, steps=steps((9, 1.0), (10, 1.0)))
    assert job.history.steps_per_s(12.0) == pytest.approx(5.0)
    assert job.history.workers[w].meter.rate(12.0) == pytest.approx(5.0)
    assert job.history.steps_per_s(30.0) == 0.0  # nothing reported lately


def test_target_reached_converges_and_final_state_never_changes(cluster):
    table = JobTable()
    job = running_job(cluster, table, spec(stop="{target: {metric: accuracy, value: 0.9}}"))
    a, b = job.workers
    ev = [Evaluation(100, "accuracy", 0.95, 0.2)]
    assert table.report_progress(job.job_id, a, 1, cluster, 2.0, evals=ev) == CONVERGED
    assert job.reason == "accuracy 0.95 reached target 0.9 at step 100"
    assert table.cancel(job.job_id, 3.0) == CONVERGED
    assert table.report_progress(job.job_id, b, 1, cluster, 3.0, failure="boom") == CONVERGED
    table.node_lost(b, 4.0, "lease expired")
    assert (job.state, job.epoch, job.workers) == (CONVERGED, 1, [a, b])
    with pytest.raises(JobStateError, match="has ended"):
        table.activate(job.job_id, a, 1, cluster, 4.0)
    assert table.assignment(a) is None


def test_patience_completes_the_job(cluster):
    table = JobTable()
    job = running_job(cluster, table, spec(stop="{max_steps: 1000, patience: 2}"))
    w = job.workers[0]
    evals = [Evaluation(s, "accuracy", v) for s, v in ((10, 0.5), (20, 0.4), (30, 0.5))]
    assert table.report_progress(job.job_id, w, 1, cluster, 2.0, evals=evals) == COMPLETED
    assert job.reason == "no improvement of more than 0 in 2 evaluations"
    assert (job.tracker.best, job.tracker.best_step) == (0.5, 10)


def test_finished_from_rank0_completes_from_others_does_not(cluster):
    table = JobTable()
    job = running_job(cluster, table)
    a, b = job.workers
    assert table.report_progress(job.job_id, b, 1, cluster, 2.0, finished=True) == RUNNING
    final = [Evaluation(10, "accuracy", 0.8)]
    assert table.report_progress(job.job_id, a, 1, cluster, 3.0, evals=final,
                                 finished=True) == COMPLETED
    assert job.reason == "reached max_steps (10)"
    assert job.tracker.latest == 0.8 and job.history.step == 10


def test_finished_workers_complete_the_job_when_rank0_is_lost(cluster):
    # Rank 1 reached the step budget first; rank 0 then died before its final report. The
    # survivor is rank 0 now, but its loop has ended: the job must not wait for it forever.
    table = JobTable()
    job = running_job(cluster, table)
    a, b = job.workers
    assert table.report_progress(job.job_id, b, 1, cluster, 2.0, finished=True) == RUNNING
    table.node_lost(a, 3.0, "lease expired")
    assert (job.state, job.reason, job.workers) == (COMPLETED, "reached max_steps (10)", [b])


def test_the_last_live_worker_to_finish_completes_the_job(cluster):
    table = JobTable()
    job = running_job(cluster, table, spec(workers=3))
    a, b, c = job.workers
    assert table.report_progress(job.job_id, b, 1, cluster, 2.0, finished=True) == RUNNING
    table.node_lost(a, 3.0, "lease expired")  # b is rank 0 now, and already done
    assert job.state == RUNNING and job.rank(b) == 0
    assert table.report_progress(job.job_id, c, 1, cluster, 4.0, finished=True) == COMPLETED


def test_non_finite_loss_fails_the_job_with_step_and_worker(cluster):
    table = JobTable()
    job = running_job(cluster, table)
    a = job.workers[0]
    state = table.report_progress(job.job_id, a, 1, cluster, 2.0,
                                  steps=steps((0, 1.0), (1, math.nan), (2, 1.0)))
    assert state == FAILED
    assert job.reason == f"loss became non-finite (nan) at step 1 on worker {a}"
    assert job.history.step == 0


def test_worker_failure_fails_the_job(cluster):
    table = JobTable()
    job = running_job(cluster, table)
    b = job.workers[1]
    assert table.report_progress(job.job_id, b, 1, cluster, 2.0, failure="CUDA OOM") == FAILED
    assert job.reason == f"worker {b} failed: CUDA OOM"


def test_failure_during_initialisation_fails_the_job_at_once(cluster):
    table = JobTable()
    job = table.submit(spec(), cluster, 0.0)
    b = job.workers[1]
    assert table.report_progress(job.job_id, b, 1, cluster, 1.0, failure="no such dataset") == FAILED
    assert job.reason == f"worker {b} failed: no such dataset"


def test_bad_reports_and_wrong_callers_change_nothing(cluster):
    table = JobTable()
    job = table.submit(spec(workers=2), cluster, 0.0)
    a = job.workers[0]
    with pytest.raises(JobStateError, match="not running"):
        table.report_progress(job.job_id, a, 1, cluster, 1.0, steps=steps((0, 1.0)))
    table.set_layout(job.job_id, a, 1, LAYOUT, cluster, 1.0)
    table.activate(job.job_id, a, 1, cluster, 1.0)
    with pytest.raises(JobStateError, match="not a live worker"):
        table.report_progress(job.job_id, "worker-000003", 1, cluster, 1.0, steps=steps((0, 1.0)))
    with pytest.raises(ValueError, match="metric"):
        table.report_progress(job.job_id, a, 1, cluster, 1.0, steps=steps((0, 1.0)),
                              evals=[Evaluation(5, "f1", 0.5)])
    with pytest.raises(ValueError, match="negative"):
        table.report_progress(job.job_id, a, 1, cluster, 1.0, steps=steps((-1, 1.0)))
    assert job.history.step == 0 and job.history.samples == 0 and not job.history.evals
    assert job.state == RUNNING


def test_cancel_pending_and_unknown(cluster):
    table = JobTable()
    job = table.submit(spec(workers=9), cluster, 0.0)
    assert table.cancel(job.job_id, 1.0) == CANCELLED
    assert job.reason == "cancelled by a client" and job.ended == 1.0
    with pytest.raises(UnknownJobError):
        table.cancel("nope-123456", 1.0)


# -- membership changes ----------------------------------------------------------------------

def test_lost_worker_is_dropped_ranks_close_up_and_epoch_bumps(cluster):
    table = JobTable()
    job = running_job(cluster, table, spec(workers=3))
    assert job.workers == ["worker-000001", "worker-000002", "worker-000003"]
    for node in ("server-000001", "server-000002", "worker-000002", "worker-000003"):
        cluster.heartbeat(node, 1, now=8.0)
    dead = table.sweep(cluster, 10.5)  # worker-000001's lease (from t=0) ran out
    assert [n.node_id for n in dead] == ["worker-000001"]
    assert job.workers == ["worker-000002", "worker-000003"]
    assert job.epoch == 2 and job.state == RUNNING
    assert job.rank("worker-000002") == 0  # the new rank 0 may now set layouts, finish, ...
    # The step the dead worker never reported is written from the ones who are left.
    table.report_progress(job.job_id, "worker-000002", 1, cluster, 11.0, steps=steps((0, 1.0)))
    table.report_progress(job.job_id, "worker-000003", 1, cluster, 11.0, steps=steps((0, 3.0)))
    assert list(job.history.losses) == [(0, 2.0)]


def test_all_workers_lost_fails_the_job(cluster):
    table = JobTable()
    job = running_job(cluster, table, spec(workers=2))
    table.node_lost("worker-000001", 2.0, "shut down")
    assert job.state == RUNNING
    table.node_lost("worker-000002", 3.0, "lease expired")
    assert (job.state, job.reason, job.epoch) == (FAILED, "all workers lost", 3)


def test_reregistered_worker_leaves_its_job(cluster):
    table = JobTable()
    job = running_job(cluster, table, spec(workers=2))
    node = cluster.register(WORKER, "", now=2.0, node_id="worker-000001")
    table.node_registered(node, 2.0)
    assert job.workers == ["worker-000002"] and job.epoch == 2
    with pytest.raises(JobStateError, match="not a live worker"):
        table.report_progress(job.job_id, "worker-000001", 2, cluster, 2.0)


def test_moved_server_updates_the_shard_map(cluster):
    table = JobTable()
    job = running_job(cluster, table)
    node = cluster.register(SERVER, "h:9", now=2.0, node_id="server-000002")
    table.node_registered(node, 2.0)
    assert [s.address for s in job.shard_map.shards] == ["h:1", "h:9"]
    assert job.shard_map.version == 2


def test_servers_see_their_jobs_including_final_ones(cluster):
    table = JobTable()
    job = running_job(cluster, table, spec(servers=1, workers=1))
    assert table.server_jobs("server-000001") == [job]
    assert table.server_jobs("server-000002") == []
    table.cancel(job.job_id, 2.0)
    assert table.server_jobs("server-000001") == [job]
    assert table.hosted("server-000001") == 0
