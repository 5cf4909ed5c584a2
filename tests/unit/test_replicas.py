"""Replicated shards without sockets: where the coordinator puts backups and how it fails
over (server/coordinator/replicas.py, through the JobTable with an injected clock), and how a
server decides what a push to a replica may do (server/ps/replication.py)."""

import threading

import grpc
import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.proto.layout import make_layout
from shardps.server.coordinator.jobs import RUNNING, JobTable
from shardps.server.coordinator.membership import Membership
from shardps.server.coordinator.replicas import holds
from shardps.server.ps.replication import ReplicaRefused, Replicas
from shardps.worker.recovery import backup_layers

SERVER, WORKER = common_pb2.ROLE_SERVER, common_pb2.ROLE_WORKER
LAYOUT = make_layout([("w", (4, 3)), ("b", (3,))])  # 15 elements
S1, S2, S3 = "server-000001", "server-000002", "server-000003"


def spec(replicas: int, servers: int = 3) -> str:
    return ("name: job\nmodel: {name: mlp}\ndata: {dataset: digits}\nstop: {max_steps: 10}\n"
            f"cluster: {{servers: {servers}, workers: 1, replicas: {replicas}}}\n")


@pytest.fixture
def cluster() -> Membership:
    """3 servers and a worker registered at t=0 with a 10 s lease."""
    m = Membership(lease_ms=10_000)
    for i in (1, 2, 3):
        m.register(SERVER, f"h:{i}", now=0.0, node_id=f"server-00000{i}")
    m.register(WORKER, "", now=0.0, node_id="worker-000001")
    return m


def running(cluster: Membership, replicas: int):
    table = JobTable()
    job = table.submit(spec(replicas), cluster, 0.0)
    table.set_layout(job.job_id, job.workers[0], 1, LAYOUT, cluster, 1.0)
    table.activate(job.job_id, job.workers[0], 1, cluster, 1.0)
    assert job.state == RUNNING
    return table, job


def layout_of(shard_map):
    return [(s.server_id, list(s.backup_ids), s.replica_epoch) for s in shard_map.shards]


def test_each_shard_gets_its_backups_on_the_next_servers(cluster):
    _, job = running(cluster, replicas=2)
    assert layout_of(job.shard_map) == [(S1, [S2], 1), (S2, [S3], 1), (S3, [S1], 1)]
    assert [list(s.backup_addresses) for s in job.shard_map.shards] == [["h:2"], ["h:3"], ["h:1"]]
    _, three = running(cluster, replicas=3)
    assert layout_of(three.shard_map)[0] == (S1, [S2, S3], 1)


def test_one_replica_leaves_the_map_as_it_always_was(cluster):
    _, job = running(cluster, replicas=1)
    assert layout_of(job.shard_map) == [(S1, [], 0), (S2, [], 0), (S3, [], 0)]
    assert all(holds(job.shard_map, s, 0) for s in (S1, S2, S3))  # no replicas: no one leaves


def test_a_dead_primary_is_replaced_by_its_backup_under_a_new_epoch(cluster):
    table, job = running(cluster, replicas=2)
    version = job.shard_map.version
    for node in (S2, S3, "worker-000001"):  # only server-000001 stops heartbeating
        cluster.heartbeat(node, 1, 9.0)
    table.sweep(cluster, 10.5)
    # Promoted (epoch 2), then each shard short of a copy gets a joining one on the live
    # server that holds none of it (epoch 3; rereplication.py).
    assert layout_of(job.shard_map) == [(S2, [], 3), (S2, [S3], 1), (S3, [], 3)]
    assert [list(s.joining_ids) for s in job.shard_map.shards] == [[S3], [], [S2]]
    assert job.shard_map.shards[0].address == "h:2"
    assert job.shard_map.version == version + 3
    assert job.rollback.id == 0 and job.state == RUNNING
    assert not holds(job.shard_map, S1, 0) and holds(job.shard_map, S2, 0)
    # Its restore report (it came back with its data dir) rolls nothing back: it is no
    # longer a replica of shard 0.
    assert not table.replica_holds(job.job_id, S1, 0)


def test_a_shard_whose_last_replica_dies_keeps_it_and_waits(cluster):
    table, job = running(cluster, replicas=2)
    cluster.heartbeat("worker-000001", 1, 9.0)
    cluster.heartbeat(S3, 1, 9.0)
    table.sweep(cluster, 10.5)  # server-000001 and server-000002 both gone
    assert layout_of(job.shard_map)[0] == (S2, [], 2)  # promoted, then lost in turn: kept
    assert layout_of(job.shard_map)[1] == (S3, [], 2)


def test_backup_layers_put_each_backup_in_its_primary_place(cluster):
    _, job = running(cluster, replicas=3)
    layers = backup_layers(job.shard_map)
    assert [[s.server_id for s in layer.shards] for layer in layers] == [[S2, S3, S1],
                                                                       [S3, S1, S2]]
    _, plain = running(cluster, replicas=1)
    assert backup_layers(plain.shard_map) == []


# -- the server side -------------------------------------------------------------------------

def replica_map(epoch: int, primary: str, backups: list[str]) -> common_pb2.ShardMap:
    shard_map = common_pb2.ShardMap(version=1)
    shard_map.shards.add(index=0, server_id=primary, address="h:0", offset=0, length=4,
                         backup_ids=backups, backup_addresses=[f"a:{b}" for b in backups],
                         replica_epoch=epoch)
    return shard_map


def header(epoch: int = 0) -> ps_pb2.PushHeader:
    return ps_pb2.PushHeader(job_id="job", shard_index=0, worker_id="worker-000001", step=0,
                             length=4, replica_epoch=epoch)


def refused(replicas: Replicas, h: ps_pb2.PushHeader) -> ReplicaRefused:
    with pytest.raises(ReplicaRefused) as info:
        replicas.check(h)
    return info.value


def test_only_the_primary_takes_a_workers_push():
    backup = Replicas(lambda: S2)
    backup.adopt("job", replica_map(1, S1, [S2]))
    exc = refused(backup, header())
    assert exc.code == grpc.StatusCode.UNAVAILABLE and "not the primary of job job shard 0" in str(exc)
    backup.check(header(epoch=1))  # the primary's forward is taken
    assert backup.describe("job", 0) == (1, "backup")
    Replicas(lambda: S1).check(header())  # a shard without replicas: as before


def test_forwards_of_an_older_epoch_are_fenced_and_maps_never_go_back():
    promoted = Replicas(lambda: S2)
    promoted.adopt("job", replica_map(2, S2, []))
    promoted.adopt("job", replica_map(1, S1, [S2]))  # a late, older map changes nothing
    assert promoted.describe("job", 0) == (2, "primary")
    exc = refused(promoted, header(epoch=1))  # the old primary, cut off, still forwarding
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION and "stale replica epoch" in str(exc)
    assert "stale replica epoch" in str(refused(promoted, header(epoch=2)))  # two primaries
    promoted.check(header())


def test_a_push_a_backup_did_not_take_is_not_acknowledged_and_is_owed_to_it():
    primary = Replicas(lambda: S1)
    m = replica_map(1, S1, [S2])
    m.shards[0].backup_addresses[0] = "127.0.0.1:1"  # nothing listens there
    primary.adopt("job", m)
    ran = []
    with pytest.raises(ReplicaRefused) as info:
        with primary.turn(header(), torch.zeros(4)) as turn:
            turn.forward()
            ran.append(True)  # the primary applies while its backups apply theirs
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"backup {S2} of job job shard 0 did not take the push" in str(info.value)
    assert ran == [True] and primary.owed(header())  # its retry is forwarded again
    primary.adopt("job", replica_map(2, S1, []))  # the coordinator dropped the backup
    with primary.turn(header(), torch.zeros(4)) as turn:
        turn.forward()
    assert not primary.owed(header())
    primary.close()


def test_a_capture_waits_for_the_pushes_that_began_before_the_shard_had_copies():
    """A shard without copies gets its first (a reshard moving a `replicas: 1` job's shard): a
    push that began before holds no turn and is not forwarded, so the capture for the joining
    copy (transfer.py, under shard_turn) must come after its apply, or the copy would lack an
    acknowledged push (seen: a moved async shard one version short of its acknowledgements)."""
    primary = Replicas(lambda: S1)
    events, captured = [], threading.Event()

    def capture():
        with primary.shard_turn("job", 0, timeout=10) as held:
            events.append(("capture", held))
        captured.set()

    with primary.turn(header(), torch.zeros(4)) as turn:  # no placement: no turn to take
        assert turn.forward() is None
        primary.adopt("job", replica_map(1, S1, []))
        capturing = threading.Thread(target=capture)
        capturing.start()
        assert not captured.wait(0.3)  # waits for this push
        events.append(("applied", None))
    capturing.join(10)
    assert events == [("applied", None), ("capture", True)]
    with primary.turn(header(), torch.zeros(4)) as turn:  # a push after the placement takes the turn
        assert turn.forward() is not None
        with primary.shard_turn("job", 0, timeout=0.1) as held:
            assert not held
    with primary.turn(header(), torch.zeros(4)):  # one that never forwards still lets a capture go
        pass
    with primary.shard_turn("job", 0, timeout=0.1) as held:
        assert held
    primary.close()


def test_a_primary_out_of_touch_with_the_coordinator_stops_acknowledging():
    touch = [True]
    primary = Replicas(lambda: S1, lambda: touch[0])
    primary.adopt("job", replica_map(1, S1, []))
    primary.check(header())
    touch[0] = False
    exc = refused(primary, header())
    assert exc.code == grpc.StatusCode.UNAVAILABLE
    assert "not acknowledging pushes to job job shard 0 as its primary" in str(exc)
    with pytest.raises(ReplicaRefused), primary.turn(header(), torch.zeros(4)) as turn:
        turn.forward()
        pytest.fail("applied while out of touch")
