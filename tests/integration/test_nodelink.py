"""The node link (runtime/nodelink.py) against the real coordinator in this process: an outage
is logged once, the node registers again under its id when the coordinator comes back, what a
failed call carried is handed back to the role, and the goodbye marks the node DEAD."""

import logging
import threading

from shardps.proto import common_pb2, coordinator_pb2
from shardps.runtime.nodelink import NodeLink
from tests.harness import poll

ALIVE, DEAD = coordinator_pb2.NODE_STATE_ALIVE, coordinator_pb2.NODE_STATE_DEAD
ADDRESS = "link.example:7"
RESTORED = coordinator_pb2.ShardVersion(job_id="job-gone", shard_index=0, version=3)


class RecordingRole:
    """A SERVER role that counts the link's calls and carries the restore reports given to it
    until a heartbeat delivers them (as a server's Checkpointer would)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.registrations = 0
        self.heartbeats = 0
        self.pending = []
        self.handed_back = 0

    def registration(self):
        return coordinator_pb2.RegisterNodeRequest(role=common_pb2.ROLE_SERVER, address=ADDRESS)

    def registered(self, reply):
        with self.lock:
            self.registrations += 1

    def heartbeat(self, lease_ms):
        with self.lock:
            self.heartbeats += 1
            restored, self.pending = self.pending, []
        return coordinator_pb2.HeartbeatRequest(restored=restored)

    def answered(self, reply):
        pass

    def forgotten(self):
        pass

    def undelivered(self, restored):
        with self.lock:
            self.handed_back += len(restored)
            self.pending[:0] = list(restored)

    def report(self, restored):
        with self.lock:
            self.pending.append(restored)

    def counts(self):
        with self.lock:
            return self.registrations, self.heartbeats, self.handed_back


def node_at(client, address):
    return next((n for n in client.nodes() if n.address == address), None)


def test_an_outage_is_logged_once_and_the_node_registers_again_under_its_id(coordinators,
                                                                             caplog):
    caplog.set_level(logging.INFO, logger="shardps.runtime.nodelink")
    first, client = coordinators(lease_ms=1000)
    role = RecordingRole()
    link = NodeLink(first.address, role).start()
    try:
        node = poll(lambda: link.registered and node_at(client, ADDRESS), 30,
                    what="registration")
        node_id = link.node_id
        assert (node.node_id, node.state) == (node_id, ALIVE)
        port = first.port
        first.stop(0)
        client.close()
        role.report(RESTORED)
        # Several failed heartbeats; each hands the restore report back to the role.
        _, beats, _ = role.counts()
        poll(lambda: role.counts()[1] >= beats + 4, 60, what="retries during the outage")
        assert role.counts()[2] >= 3 and link.registered
        _, client = coordinators(port=port, lease_ms=1000)
        again = poll(lambda: node_at(client, ADDRESS), 30, what="re-registration")
        assert again.node_id == node_id and again.state == ALIVE
        # The link tells the role once the reply is in, just after the coordinator listed it.
        poll(lambda: role.counts()[0] == 2, 10, interval=0.02, what="the role told of it")
        poll(lambda: not role.pending, 30, what="the restore report delivered")
        assert link.incarnation == 1  # a new coordinator's first incarnation of the id
    finally:
        link.stop()
    assert not link.running
    assert node_at(client, ADDRESS).state == DEAD  # the goodbye
    client.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages
