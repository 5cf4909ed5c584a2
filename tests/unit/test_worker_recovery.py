"""What a worker does about parameter-server failures: which errors it retries, and a client
that follows a moved server."""

import grpc
import pytest

from shardps.proto import common_pb2, refusals
from shardps.worker import recovery

C = grpc.StatusCode


@pytest.mark.parametrize("code, details, action", [
    (C.UNAVAILABLE, "connection refused", recovery.RETRY),
    (C.DEADLINE_EXCEEDED, "", recovery.RETRY),
    (C.NOT_FOUND, "unknown job or shard", recovery.RETRY),  # restarting elsewhere
    (C.FAILED_PRECONDITION, refusals.FENCED + " declared dead", recovery.FENCED),
    (C.FAILED_PRECONDITION, refusals.STEP_AHEAD + " step 9", recovery.RESYNC),
    (C.FAILED_PRECONDITION, refusals.NOT_LIVE + " of this job", recovery.RETRY),
    (C.FAILED_PRECONDITION, "something else", recovery.ABANDON),
    (C.INVALID_ARGUMENT, "non-finite", recovery.INVALID),
    (C.PERMISSION_DENIED, "", recovery.ABANDON),
])
def test_classify(code, details, action):
    assert recovery.classify(code, details) == action


def test_stale_incarnation_is_the_coordinators_register_again():
    assert recovery.stale_incarnation(C.FAILED_PRECONDITION, "node w was declared dead; "
                                                             "register again")
    assert not recovery.stale_incarnation(C.FAILED_PRECONDITION, "job has ended")
    assert not recovery.stale_incarnation(C.NOT_FOUND, "register again")


def test_remappable_client_follows_a_new_shard_map():
    made, closed = [], []

    class Fake:
        pulled = None

        def __init__(self, job_id, shard_map, **kw):
            self.shard_map = shard_map
            made.append(self)

        def pull(self, dest, **kw):
            return self.shard_map.shards[0].address

        def close(self):
            closed.append(self)

    old = common_pb2.ShardMap(version=1)
    old.shards.add(index=0, address="h:1", length=3)
    client = recovery.RemappableClient(Fake, "job", old, worker_id="w")
    pull = client.pull  # bound before the move, as the trainer's partials are
    assert pull(None) == "h:1"
    assert not client.remap(old) and not client.remap(common_pb2.ShardMap())
    moved = common_pb2.ShardMap(version=2)
    moved.shards.add(index=0, address="h:2", length=3)
    assert client.remap(moved)
    assert pull(None) == "h:2" and closed == [made[0]]


def test_a_map_that_changes_only_copies_keeps_the_connections():
    made = []

    class Fake:
        pulled = None

        def __init__(self, job_id, shard_map, **kw):
            made.append(shard_map)

        def close(self):
            pass

    old = common_pb2.ShardMap(version=1)
    old.shards.add(index=0, server_id="a", address="h:1", length=3, replica_epoch=1,
                   backup_ids=["b"], backup_addresses=["h:2"])
    client = recovery.RemappableClient(Fake, "job", old, worker_id="w")
    dropped = common_pb2.ShardMap(version=2)
    dropped.shards.add(index=0, server_id="a", address="h:1", length=3, replica_epoch=2)
    assert not client.remap(dropped)
    assert client.shard_map == dropped and len(made) == 1
    promoted = common_pb2.ShardMap(version=3)
    promoted.shards.add(index=0, server_id="b", address="h:2", length=3, replica_epoch=3)
    assert client.remap(promoted) and len(made) == 2
