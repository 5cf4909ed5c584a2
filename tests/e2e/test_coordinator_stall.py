"""A coordinator that stalls (here SIGSTOPped, as a starved or paused process would be) does
not declare its live nodes dead when it resumes: their heartbeats could not reach it, so
leases do not count the stall, and a daemon's link keeps trying within lease/4 however long
the outage, so its heartbeat lands in time after the resume (docs/architecture.md, "The
coordinator stalls"). A node that was already silent still expires after the resume."""

import os
import signal
import time

import pytest

from shardps.client.api import CoordinatorClient
from shardps.proto import coordinator_pb2, coordinator_pb2_grpc
from shardps.runtime import rpc
from shardps.runtime.nodelink import NodeLink
from tests import harness
from tests.cluster import RegisteredWorker
from tests.integration.test_nodelink import ADDRESS, RecordingRole

pytestmark = pytest.mark.timeout(120)

LEASE_MS = 2000
ALIVE = coordinator_pb2.NODE_STATE_ALIVE


def test_a_stalled_coordinator_expires_no_live_node_on_resume():
    coord = harness.start("shardps-coordinator", "--port", "0", "--lease-ms", str(LEASE_MS))
    channel = rpc.make_channel(coord.address)
    client = CoordinatorClient(coord.address)
    link = NodeLink(coord.address, RecordingRole()).start()  # as a server's or worker's
    live = silent = None
    try:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        live, silent = RegisteredWorker(stub), RegisteredWorker(stub)
        harness.poll(lambda: link.registered, 30, what="the link registered")
        silent.stop(goodbye=False)  # expires one lease from now, stall or not
        os.kill(coord.pid, signal.SIGSTOP)
        time.sleep(3 * LEASE_MS / 1000)  # the link's backoff alone would reach 2 s pauses
        os.kill(coord.pid, signal.SIGCONT)
        harness.poll(lambda: any(n.node_id == silent.node_id and n.state != ALIVE
                                 for n in client.nodes()), 30, what="the silent node expired")
        time.sleep(LEASE_MS / 1000)  # the others' heartbeats land again and renew them
        nodes = {n.node_id: n for n in client.nodes()}
        for node_id in (live.node_id, link.node_id):
            assert (nodes[node_id].state, nodes[node_id].incarnation) == (ALIVE, 1), nodes
        assert nodes[link.node_id].address == ADDRESS
        assert coord.has_line(r"this coordinator stalled"), coord.output()
    finally:
        link.stop()
        for node in (live, silent):
            if node is not None:
                node.stop(goodbye=False)
        client.close()
        channel.close()
        coord.stop()
