"""A coordinator that stalls (here SIGSTOPped, as a starved or paused process would be) does
not declare its live nodes dead when it resumes: their heartbeats could not reach it, so
leases do not count the stall (docs/architecture.md, "Failures"). A node that was already
silent still expires after the resume."""

import os
import signal
import time

import pytest

from shardps.client.api import CoordinatorClient
from shardps.proto import coordinator_pb2, coordinator_pb2_grpc
from shardps.runtime import rpc
from tests import harness
from tests.cluster import RegisteredWorker

pytestmark = pytest.mark.timeout(120)

LEASE_MS = 1000
ALIVE = coordinator_pb2.NODE_STATE_ALIVE


def test_a_stalled_coordinator_expires_no_live_node_on_resume():
    coord = harness.start("shardps-coordinator", "--port", "0", "--lease-ms", str(LEASE_MS))
    channel = rpc.make_channel(coord.address)
    client = CoordinatorClient(coord.address)
    live = silent = None
    try:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        live, silent = RegisteredWorker(stub), RegisteredWorker(stub)
        silent.stop(goodbye=False)  # expires one lease from now, stall or not
        os.kill(coord.pid, signal.SIGSTOP)
        time.sleep(4 * LEASE_MS / 1000)
        os.kill(coord.pid, signal.SIGCONT)
        nodes = harness.poll(lambda: {n.node_id: n for n in client.nodes()
                                      if n.node_id == silent.node_id and n.state != ALIVE}
                             and client.nodes(), 30, what="the silent node expired")
        by_id = {n.node_id: n for n in nodes}
        assert by_id[live.node_id].state == ALIVE and by_id[live.node_id].incarnation == 1
        time.sleep(2 * LEASE_MS / 1000)  # and it stays so: its heartbeats land again
        again = {n.node_id: n for n in client.nodes()}[live.node_id]
        assert again.state == ALIVE and again.incarnation == 1
        assert coord.has_line(r"this coordinator stalled"), coord.output()
    finally:
        for node in (live, silent):
            if node is not None:
                node.stop(goodbye=False)
        client.close()
        channel.close()
        coord.stop()
