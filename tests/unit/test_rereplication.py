"""Copies of a running job's shards without sockets (server/coordinator/rereplication.py):
a joining copy added, made a backup when it reports itself caught up, promoted, dropped, and
re-replication after a failover, through the JobTable with an injected clock."""

import pytest

from shardps.proto import common_pb2
from shardps.proto.layout import make_layout
from shardps.server.coordinator import rereplication
from shardps.server.coordinator.jobs import RUNNING, JobTable
from shardps.server.coordinator.membership import Membership
from shardps.server.coordinator.rereplication import CopyError

SERVER, WORKER = common_pb2.ROLE_SERVER, common_pb2.ROLE_WORKER
LAYOUT = make_layout([("w", (4, 3)), ("b", (3,))])  # 15 elements
S1, S2, S3 = "server-000001", "server-000002", "server-000003"


@pytest.fixture
def cluster() -> Membership:
    m = Membership(lease_ms=10_000)
    for i in (1, 2, 3):
        m.register(SERVER, f"h:{i}", now=0.0, node_id=f"server-00000{i}")
    m.register(WORKER, "", now=0.0, node_id="worker-000001")
    return m


def running(cluster: Membership, replicas: int, servers: int = 3):
    table = JobTable()
    job = table.submit("name: job\nmodel: {name: mlp}\ndata: {dataset: digits}\n"
                       "stop: {max_steps: 10}\n"
                       f"cluster: {{servers: {servers}, workers: 1, replicas: {replicas}}}\n",
                       cluster, 0.0)
    table.set_layout(job.job_id, job.workers[0], 1, LAYOUT, cluster, 1.0)
    table.activate(job.job_id, job.workers[0], 1, cluster, 1.0)
    assert job.state == RUNNING
    return table, job


def copies_of(shard):
    return (shard.server_id, list(shard.backup_ids), list(shard.joining_ids), shard.replica_epoch)


def test_a_joining_copy_becomes_a_backup_only_when_caught_up_under_its_join_epoch(cluster):
    _, job = running(cluster, replicas=2)
    shard, version = job.shard_map.shards[0], job.shard_map.version
    epoch = rereplication.add_copy(job, 0, S3, "h:3")
    assert epoch == 2 and copies_of(shard) == (S1, [S2], [S3], 2)
    assert list(shard.joining_epochs) == [2] and list(shard.joining_addresses) == ["h:3"]
    assert job.shard_map.version == version + 1
    assert not rereplication.copy_caught_up(job, 0, S3, 1)  # another join: nothing changes
    assert not rereplication.copy_caught_up(job, 0, S2, 2)
    assert copies_of(shard) == (S1, [S2], [S3], 2)
    assert rereplication.copy_caught_up(job, 0, S3, 2)
    assert copies_of(shard) == (S1, [S2, S3], [], 3)
    assert list(shard.backup_addresses) == ["h:2", "h:3"]
    assert not rereplication.copy_caught_up(job, 0, S3, 2)  # a repeated report: nothing
    with pytest.raises(CopyError, match="already holds"):
        rereplication.add_copy(job, 0, S2, "h:2")


def test_moving_a_shard_of_an_unreplicated_job_add_promote_drop(cluster):
    """The resharding sequence on a job with replicas: 1 (epoch 0: then 1, 2, ...)."""
    _, job = running(cluster, replicas=1)
    shard = job.shard_map.shards[1]
    assert copies_of(shard) == (S2, [], [], 0)
    join = rereplication.add_copy(job, 1, S1, "h:1")
    assert copies_of(shard) == (S2, [], [S1], 1)
    assert rereplication.copy_caught_up(job, 1, S1, join)
    rereplication.promote(job, 1, S1)
    assert copies_of(shard) == (S1, [S2], [], 3) and shard.address == "h:1"
    with pytest.raises(CopyError, match="is the primary"):
        rereplication.drop_copy(job, 1, S1)
    rereplication.drop_copy(job, 1, S2)
    assert copies_of(shard) == (S1, [], [], 4)
    with pytest.raises(CopyError, match="holds no copy"):
        rereplication.drop_copy(job, 1, S3)
    with pytest.raises(CopyError, match="is not a backup"):
        rereplication.promote(job, 1, S3)
    with pytest.raises(CopyError, match="has no shard 7"):
        rereplication.add_copy(job, 7, S3, "h:3")


def test_a_failover_is_followed_by_a_joining_copy_on_a_free_live_server(cluster):
    table, job = running(cluster, replicas=2)
    for node in (S2, S3, "worker-000001"):  # server-000001 stops heartbeating
        cluster.heartbeat(node, 1, 9.0)
    table.sweep(cluster, 10.5)
    shards = job.shard_map.shards
    assert copies_of(shards[0]) == (S2, [], [S3], 3)   # promoted S2, then S3 joins
    assert copies_of(shards[1]) == (S2, [S3], [], 1)
    assert copies_of(shards[2]) == (S3, [], [S2], 3)   # lost its backup S1, then S2 joins
    table.sweep(cluster, 11.0)  # enough copies now: nothing more
    assert copies_of(shards[0]) == (S2, [], [S3], 3)


def test_no_free_server_waits_for_the_returning_one(cluster):
    """2 servers, R = 2: after a failover no live server is free; once the lost one is back
    (same node id) it joins every shard it lacks."""
    table, job = running(cluster, replicas=2, servers=2)
    cluster.heartbeat(S2, 1, 9.0)
    cluster.heartbeat("worker-000001", 1, 9.0)
    table.sweep(cluster, 10.5)  # S1 lost
    shards = job.shard_map.shards
    assert [copies_of(s) for s in shards] == [(S2, [], [], 2), (S2, [], [], 2)]
    back = cluster.register(SERVER, "h:1b", now=11.0, node_id=S1)
    table.node_registered(back, 11.0)
    cluster.heartbeat(S2, 1, 11.0)
    cluster.heartbeat("worker-000001", 1, 11.0)
    table.sweep(cluster, 11.0)
    assert [copies_of(s) for s in shards] == [(S2, [], [S1], 3), (S2, [], [S1], 3)]
    assert list(shards[0].joining_addresses) == ["h:1b"]


def test_a_join_not_caught_up_in_time_is_dropped_and_added_again(cluster):
    table, job = running(cluster, replicas=2)
    for node in (S2, S3, "worker-000001"):
        cluster.heartbeat(node, 1, 9.0)
    table.sweep(cluster, 10.5)
    shard = job.shard_map.shards[0]
    assert copies_of(shard) == (S2, [], [S3], 3)
    for node in (S2, S3, "worker-000001"):
        cluster.heartbeat(node, 1, 10.5 + rereplication.JOIN_TIMEOUT_S)
    table.sweep(cluster, 11.0 + rereplication.JOIN_TIMEOUT_S)
    # Dropped (epoch 4), added again under a new join epoch (5): its old report is void.
    assert copies_of(shard) == (S2, [], [S3], 5) and list(shard.joining_epochs) == [5]
    assert not rereplication.copy_caught_up(job, 0, S3, 3)


def test_a_lost_joining_copy_leaves_the_map(cluster):
    table, job = running(cluster, replicas=2)
    rereplication.add_copy(job, 0, S3, "h:3")
    for node in (S1, S2, "worker-000001"):  # server-000003 stops heartbeating
        cluster.heartbeat(node, 1, 9.0)
    table.sweep(cluster, 10.5)
    assert copies_of(job.shard_map.shards[0])[2] == []


def test_a_stalled_move_of_an_unreplicated_job_is_dropped_too(cluster):
    table, job = running(cluster, replicas=1)
    rereplication.add_copy(job, 1, S1, "h:1")
    everyone = (S1, S2, S3, "worker-000001")
    for node in everyone:
        cluster.heartbeat(node, 1, 9.0)
    table.sweep(cluster, 10.0)  # its join's clock starts
    assert copies_of(job.shard_map.shards[1]) == (S2, [], [S1], 1)
    for node in everyone:
        cluster.heartbeat(node, 1, 10.0 + rereplication.JOIN_TIMEOUT_S)
    table.sweep(cluster, 10.5 + rereplication.JOIN_TIMEOUT_S)
    assert copies_of(job.shard_map.shards[1]) == (S2, [], [], 2)  # and no new copy: R = 1


def test_a_server_restarted_within_its_lease_is_failed_over_not_restored(cluster):
    """2 servers, R = 2: S1 restarts faster than the lease and registers again before it
    expired, reporting shard 0 (it was primary) restored at an older version. Its old
    incarnation is lost as at an expiry: S2 is promoted, the restore is ignored (no rollback,
    nothing counted lost) and S1 joins back by transfer."""
    table, job = running(cluster, replicas=2, servers=2)
    shards = job.shard_map.shards
    assert [copies_of(s)[:2] for s in shards] == [(S1, [S2]), (S2, [S1])]
    back = cluster.register(SERVER, "h:1b", now=5.0, node_id=S1)  # incarnation 2, no expiry
    table.node_registered(back, 5.0)
    assert [copies_of(s) for s in shards] == [(S2, [], [], 2), (S2, [], [], 2)]
    assert not table.replica_holds(job.job_id, S1, 0)  # its restore report is ignored
    assert job.rollback.id == 0
    for node in (S1, S2, "worker-000001"):
        cluster.heartbeat(node, 2 if node == S1 else 1, 5.5)
    table.sweep(cluster, 5.5)
    assert [copies_of(s) for s in shards] == [(S2, [], [S1], 3), (S2, [], [S1], 3)]
    assert list(shards[0].joining_addresses) == ["h:1b"]
