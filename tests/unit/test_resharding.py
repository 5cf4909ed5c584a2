"""Live resharding in the coordinator's core, without sockets or sleeps
(server/coordinator/resharding.py through the JobTable, with an injected clock): the moves
start two at a time as joining copies, finish once their copy caught up (promote, drop the
source), retry or fail, and refusals change nothing."""

import pytest

from shardps.proto import common_pb2
from shardps.proto import coordinator_pb2 as pb
from shardps.proto.layout import make_layout
from shardps.server.coordinator import rereplication, resharding
from shardps.server.coordinator.jobs import RUNNING, JobStateError, JobTable
from shardps.server.coordinator.membership import Membership
from shardps.server.coordinator.reshardplan import PlanError
from shardps.server.coordinator.views import job_info

SERVER, WORKER = 1, 2
LAYOUT = make_layout([("w", (4, 3)), ("b", (3,))])  # 15 elements
S1, S2, S3, S4 = (f"server-00000{i}" for i in (1, 2, 3, 4))
W = "worker-000001"


def spec(replicas: int = 1, shards: int = 4) -> str:
    return ("name: job\nmodel: {name: mlp}\ndata: {dataset: digits}\nstop: {max_steps: 10}\n"
            f"cluster: {{servers: 2, workers: 1, replicas: {replicas}, shards: {shards}}}\n")


@pytest.fixture
def cluster() -> Membership:
    """4 servers and a worker registered at t=0 with a 10 s lease."""
    m = Membership(lease_ms=10_000)
    for i in (1, 2, 3, 4):
        m.register(SERVER, f"h:{i}", now=0.0, node_id=f"server-00000{i}")
    m.register(WORKER, "", now=0.0, node_id=W)
    return m


def running(cluster: Membership, replicas: int = 1):
    table = JobTable()
    job = table.submit(spec(replicas), cluster, 0.0)
    table.set_layout(job.job_id, W, 1, LAYOUT, cluster, 1.0)
    table.activate(job.job_id, W, 1, cluster, 1.0)
    assert job.state == RUNNING and job.servers == [S1, S2]
    return table, job


def placement(job):
    return [(s.server_id, list(s.backup_ids), list(s.joining_ids)) for s in job.shard_map.shards]


def beat(cluster: Membership, now: float) -> None:
    for node in (S1, S2, S3, S4, W):
        cluster.heartbeat(node, 1, now)


def caught_up(job, index: int, server: str) -> None:
    shard = job.shard_map.shards[index]
    k = list(shard.joining_ids).index(server)
    assert rereplication.copy_caught_up(job, index, server, shard.joining_epochs[k])


def test_growing_moves_two_shards_to_the_new_servers_and_back(cluster):
    table, job = running(cluster)
    assert placement(job) == [(S1, [], []), (S2, [], []), (S1, [], []), (S2, [], [])]
    table.reshard(job.job_id, 4, cluster, 2.0)
    assert placement(job)[2:] == [(S1, [], [S3]), (S2, [], [S4])]  # both moves started
    assert job.servers == [S1, S2, S3, S4]
    shown = job_info(job, 2.5).reshard
    assert shown.state == pb.RESHARD_STATE_RUNNING and shown.moves_total == 2
    assert [(m.shard_index, m.source, m.target, m.phase) for m in shown.moves] == [
        (2, S1, S3, "joining"), (3, S2, S4, "joining")]
    caught_up(job, 2, S3)
    epoch = job.shard_map.shards[2].replica_epoch
    table.sweep(cluster, 3.0)
    assert placement(job)[2] == (S3, [], [])  # promoted, then the source dropped
    assert job.shard_map.shards[2].replica_epoch == epoch + 2
    assert job.shard_map.shards[2].address == "h:3"
    caught_up(job, 3, S4)
    table.sweep(cluster, 4.0)
    assert placement(job) == [(S1, [], []), (S2, [], []), (S3, [], []), (S4, [], [])]
    # Every move is done, but the sources have not heard of it yet.
    assert job.reshard.state == pb.RESHARD_STATE_RUNNING
    beat(cluster, 4.5)
    table.sweep(cluster, 5.0)
    assert job.reshard.state == pb.RESHARD_STATE_DONE and job.servers == [S1, S2, S3, S4]

    table.reshard(job.job_id, 2, cluster, 6.0)  # and back: drains S3 and S4
    assert placement(job)[2:] == [(S3, [], [S1]), (S4, [], [S2])]
    caught_up(job, 2, S1)
    caught_up(job, 3, S2)
    beat(cluster, 7.0)
    table.sweep(cluster, 7.0)
    beat(cluster, 8.0)
    table.sweep(cluster, 8.0)
    assert placement(job) == [(S1, [], []), (S2, [], []), (S1, [], []), (S2, [], [])]
    assert job.reshard.state == pb.RESHARD_STATE_DONE and job.servers == [S1, S2]
    assert job_info(job, 9.0).reshard.moves_done == 2


def test_replicated_moves_keep_every_copy_on_its_own_server(cluster):
    table, job = running(cluster, replicas=2)
    table.reshard(job.job_id, 4, cluster, 2.0)
    for _ in range(4):  # every joining copy catches up, in as many rounds as it takes
        for shard in job.shard_map.shards:
            for server in list(shard.joining_ids):
                caught_up(job, shard.index, server)
        beat(cluster, 3.0 + _)
        table.sweep(cluster, 3.0 + _)
    assert job.reshard.state == pb.RESHARD_STATE_DONE
    copies = [[s.server_id, *s.backup_ids] for s in job.shard_map.shards]
    assert all(len(set(c)) == 2 and not s.joining_ids
               for c, s in zip(copies, job.shard_map.shards, strict=True))
    assert sorted(c[0] for c in copies) == [S1, S2, S3, S4]


def test_refusals_change_nothing(cluster):
    table, job = running(cluster)
    before = job.shard_map.SerializeToString()
    with pytest.raises(PlanError, match="servers: 5 > the job's 4 shards"):
        table.reshard(job.job_id, 5, cluster, 2.0)
    assert job.shard_map.SerializeToString() == before and job.reshard is None
    table.reshard(job.job_id, 3, cluster, 2.0)
    with pytest.raises(JobStateError, match="already being resharded to 3 servers"):
        table.reshard(job.job_id, 4, cluster, 2.0)
    assert job.reshard.after == [S1, S2, S3]


def test_refusals_without_servers_or_of_an_ended_job_change_nothing(cluster):
    table, job = running(cluster)
    before = job.shard_map.SerializeToString()
    for node in (S1, S2, W):
        cluster.heartbeat(node, 1, 9.0)
    table.sweep(cluster, 10.5)  # S3 and S4 are gone
    with pytest.raises(PlanError, match="servers: 3 needs 1 more server"):
        table.reshard(job.job_id, 3, cluster, 11.0)
    table.cancel(job.job_id, 11.0)
    with pytest.raises(JobStateError, match="only a running job can be resharded"):
        table.reshard(job.job_id, 2, cluster, 11.0)
    assert job.shard_map.SerializeToString() == before and job.reshard is None


def test_a_job_with_embedding_tables_is_refused_replicas_and_reshards(cluster):
    """SetLayout refuses tables with replicas (naming cluster.replicas, nothing stored);
    a reshard of a job with tables is refused and changes nothing."""
    tabled = common_pb2.Layout()
    tabled.CopyFrom(LAYOUT)
    tabled.tables.extend(["emb", "bag", "a", "b", "c", "d"])
    table = JobTable()
    job = table.submit(spec(replicas=2), cluster, 0.0)
    with pytest.raises(ValueError, match=r"^cluster.replicas: a model with embedding tables "
                                         r"\(emb, bag, a, b and 2 more\) cannot have replicas "
                                         r"yet: 2 > 1"):
        table.set_layout(job.job_id, W, 1, tabled, cluster, 1.0)
    assert job.layout is None and job.shard_map is None
    table.cancel(job.job_id, 1.0)  # (its worker fails it)
    job = table.submit(spec(), cluster, 1.0)
    table.set_layout(job.job_id, W, 1, tabled, cluster, 1.0)
    table.activate(job.job_id, W, 1, cluster, 1.0)
    before = job.shard_map.SerializeToString()
    with pytest.raises(JobStateError, match="has embedding tables .* cannot be resharded yet"):
        table.reshard(job.job_id, 4, cluster, 2.0)
    assert job.shard_map.SerializeToString() == before and job.reshard is None
    assert job.servers == [S1, S2]


def test_a_copy_that_never_catches_up_is_retried_then_the_reshard_fails(cluster):
    table, job = running(cluster)
    table.reshard(job.job_id, 3, cluster, 2.0)
    assert placement(job)[3] == (S2, [], [S3])  # one move: S2's second shard to S3
    now = 2.0
    for tries in (2, 3):
        now += resharding.JOIN_TIMEOUT_S + 1
        beat(cluster, now)
        table.sweep(cluster, now)
        assert job.reshard.runs[0].tries == tries and placement(job)[3] == (S2, [], [S3])
    now += resharding.JOIN_TIMEOUT_S + 1
    beat(cluster, now)
    table.sweep(cluster, now)
    assert job.reshard.state == pb.RESHARD_STATE_FAILED
    assert "shard 3: the copy on server-000003 did not catch up in time (3 tries)" in \
        job.reshard.message
    assert placement(job)[3] == (S2, [], []) and job.servers == [S1, S2]
    assert job.state == RUNNING  # the job goes on where its shards are


def test_a_reshard_of_a_job_that_ends_fails(cluster):
    table, job = running(cluster)
    table.reshard(job.job_id, 4, cluster, 2.0)
    table.cancel(job.job_id, 3.0)
    table.sweep(cluster, 3.0)
    assert job.reshard.state == pb.RESHARD_STATE_FAILED
    assert job.reshard.message == "the job ended (CANCELLED)"


def test_a_server_lost_before_the_reshard_is_replaced_by_a_free_one(cluster):
    """R = 2 on 2 servers; S2 dies (its shards fail over to S1, which holds them all now):
    a reshard to 2 keeps the live S1 and takes a free server in S2's place."""
    table, job = running(cluster, replicas=2)
    for node in (S1, S3, S4, W):
        cluster.heartbeat(node, 1, 9.0)
    table.sweep(cluster, 10.5)
    assert [s.server_id for s in job.shard_map.shards] == [S1] * 4
    reshard = table.reshard(job.job_id, 2, cluster, 11.0)
    assert reshard.after == [S1, S3] and reshard.running
    assert {(r.move.source, r.move.target) for r in reshard.runs} == {(S1, S3)}
    assert len(reshard.runs) == 2
