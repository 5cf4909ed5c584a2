"""How a job's end settles (docs/architecture.md, "Job life cycle" 8-9): the final version
the coordinator names, the round a frozen sync shard holds until then, late step reports
and a restored job's workers, all with an injected clock and no sockets."""

import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.server.coordinator import endings
from shardps.server.coordinator.endings import Ending
from shardps.server.coordinator.history import Evaluation
from shardps.server.coordinator.jobs import CANCELLED, COMPLETED, CONVERGED, RUNNING, JobTable
from shardps.server.coordinator.membership import Membership
from shardps.server.coordinator.state import dump, restore
from shardps.server.ps.shard import Shard
from tests.unit.test_coord_jobs import cluster, renew, running_job, spec, steps  # noqa: F401 (fixture)
from tests.unit.test_ps_shard import SYNC, make_config, make_shard, push

JOB_DONE = ps_pb2.PUSH_STATUS_JOB_DONE
N = 8


def test_the_final_version_is_the_highest_a_server_froze_at():
    ending = Ending()
    endings.begin(ending, sync=True, version=None, now=0.0)
    assert ending.final_version == -1 and ending.last_step is None
    assert not endings.shard_frozen(ending, 2, 0, 41)
    assert not endings.shard_frozen(ending, 2, 5, 40)  # no such shard
    assert endings.shard_frozen(ending, 2, 1, 42)
    assert ending.final_version == 42 and ending.last_step == 41
    assert not endings.shard_frozen(ending, 2, 0, 43)  # named: later reports change nothing
    assert ending.final_version == 42


def test_a_step_verdict_names_its_version_and_late_reports_count_up_to_it():
    ending = Ending()
    endings.begin(ending, sync=True, version=300, now=10.0)
    assert ending.final_version == 300
    assert endings.counts(ending, 299, 11.0) and not endings.counts(ending, 300, 11.0)
    assert not endings.counts(ending, 299, 10.0 + endings.SETTLE_S + 1)
    other = Ending()
    endings.begin(other, sync=False, version=300, now=0.0)  # async: no common version
    assert other.final_version == -1 and endings.counts(other, 10_000, 1.0)


def _verdict_job(cluster):  # noqa: F811
    table = JobTable()
    text = spec(stop="{max_steps: 1000, target: {metric: accuracy, value: 0.9}}")
    job = running_job(cluster, table, text)
    rank0, rank1 = job.workers
    table.report_progress(job.job_id, rank0, 1, cluster, 2.0, steps=steps((0, 1.0), (1, 0.8)))
    table.report_progress(job.job_id, rank1, 1, cluster, 2.0, steps=steps((0, 1.2)))
    return table, job, rank0, rank1


def test_a_late_report_of_the_last_step_completes_the_loss_curve(cluster):  # noqa: F811
    table, job, rank0, rank1 = _verdict_job(cluster)
    state = table.report_progress(job.job_id, rank0, 1, cluster, 3.0,
                                  evals=[Evaluation(2, "accuracy", 0.95)])
    assert state == CONVERGED and job.ending.final_version == 2
    assert job.history.losses[-1] == (0, 1.1)  # step 1 waits for rank 1
    table.report_progress(job.job_id, rank1, 1, cluster, 4.0,
                          steps=steps((1, 0.6), (2, 5.0)))  # step 2 is past the final version
    assert list(job.history.losses)[-1] == (1, 0.7)
    assert job.history.open_steps == 0


def test_open_steps_are_written_when_the_settling_time_is_up(cluster):  # noqa: F811
    table, job, rank0, _ = _verdict_job(cluster)
    assert table.cancel(job.job_id, 3.0) == CANCELLED
    assert job.ending.final_version == -1 and job.history.open_steps == 1
    renew(cluster, 3.0 + endings.SETTLE_S + 1)
    table.sweep(cluster, 3.0 + endings.SETTLE_S + 1)
    assert job.history.open_steps == 0 and job.history.losses[-1] == (1, 0.8)
    # the servers report where they froze: the highest names the final version
    assert table.shards_frozen(job.servers[0], [(job.job_id, 0, 7)]) == []
    assert table.shards_frozen(job.servers[0], [(job.job_id, 1, 8)]) == []  # not its shard
    assert table.shards_frozen(job.servers[1], [(job.job_id, 1, 8)]) == [job]
    assert job.ending.final_version == 8


def test_a_restored_running_job_takes_no_new_worker_until_its_own_are_back_or_lost(cluster):  # noqa: F811
    table = JobTable()
    job = running_job(cluster, table, spec(workers=2))
    rank0, rank1 = job.workers
    cluster.heartbeat(rank0, 1, 2.0, True)  # its goodbye
    table.node_lost(rank0, 2.0, "shut down")
    assert job.state == RUNNING and job.workers == [rank1]
    restored = JobTable()
    restored.load([job])
    restored.schedule(cluster, 3.0)
    assert job.workers == [rank1]  # worker-000003 is idle, but rank 1 may still come back
    restored.node_seen(rank1)
    restored.schedule(cluster, 4.0)
    assert job.workers == [rank1, "worker-000003"]


def test_a_frozen_sync_shard_holds_its_round_and_closes_it_when_the_version_is_named():
    behind = make_shard(torch.zeros(N), mode=SYNC, workers=["w0", "w1"])
    push(behind, torch.ones(N), worker="w0")  # round 0 open
    assert behind.set_job_state(common_pb2.JOB_STATE_CANCELLED)
    assert behind.frozen and not behind.settled
    assert push(behind, torch.ones(N), worker="w1").status == JOB_DONE  # held, not applied
    assert behind.version == 0 and push(behind, torch.ones(N), worker="w1").status == JOB_DONE
    assert not behind.set_job_state(common_pb2.JOB_STATE_CANCELLED, final_version=1)
    assert behind.settled and behind.version == 1  # the round the other shards applied

    ahead = make_shard(torch.zeros(N), mode=SYNC, workers=["w0", "w1"])
    push(ahead, torch.ones(N), worker="w0")
    ahead.set_job_state(common_pb2.JOB_STATE_CONVERGED, final_version=0)
    assert ahead.settled and ahead.version == 0  # a round past the final version is dropped
    assert push(ahead, torch.ones(N), worker="w1").status == JOB_DONE and ahead.version == 0


def test_a_sync_push_at_the_step_budget_is_refused_before_any_verdict():
    config = make_config(mode=SYNC, length=N)
    config.step_budget = 1
    shard = Shard(config, torch.zeros(N))
    assert push(shard, torch.ones(N), step=0).status == ps_pb2.PUSH_STATUS_APPLIED
    assert push(shard, torch.ones(N), step=1).status == JOB_DONE and shard.version == 1
    assert not shard.frozen and shard.job_state != COMPLETED


def test_an_ending_survives_a_coordinator_restart(cluster):  # noqa: F811
    table, job, _, _ = _verdict_job(cluster)
    table.cancel(job.job_id, 3.0)
    table.shards_frozen(job.servers[0], [(job.job_id, 0, 7)])
    doc = dump(cluster, table, now=4.0, wall=1000.0, cache={})
    table2, membership2 = JobTable(), Membership(lease_ms=10_000)
    restore(doc, membership2, table2, now=50.0, wall=1001.0)
    again = table2.get(job.job_id)
    assert again.ending.frozen == {0: 7} and again.ending.final_version == -1
    assert again.ending.settle_by == pytest.approx(50.0 - 1.0 + endings.SETTLE_S - 1.0)
    assert table2.shards_frozen(job.servers[1], [(job.job_id, 1, 8)]) == [again]
    assert again.ending.final_version == 8
