"""Membership: registration, incarnations and leases, with an injected clock."""

import re

import pytest

from shardps.proto import common_pb2
from shardps.server.coordinator.membership import Membership, StaleNodeError, UnknownNodeError

SERVER, WORKER = common_pb2.ROLE_SERVER, common_pb2.ROLE_WORKER


def test_register_gives_role_prefixed_ids_at_incarnation_one():
    m = Membership(lease_ms=1000)
    server = m.register(SERVER, "10.0.0.1:7000", now=0.0)
    worker = m.register(WORKER, "", now=0.0, device="cuda:0")
    assert re.fullmatch(r"server-[0-9a-f]{6}", server.node_id)
    assert re.fullmatch(r"worker-[0-9a-f]{6}", worker.node_id)
    assert server.incarnation == worker.incarnation == 1
    assert [n.node_id for n in m.alive(SERVER)] == [server.node_id]
    assert m.get(worker.node_id).device == "cuda:0"


def test_lease_expires_only_after_lease_ms_without_heartbeat():
    m = Membership(lease_ms=1000)
    node = m.register(WORKER, "", now=0.0)
    assert m.heartbeat(node.node_id, 1, now=0.75)
    assert m.expire(now=1.75) == []  # exactly one lease after the heartbeat: still alive
    dead = m.expire(now=1.76)
    assert [n.node_id for n in dead] == [node.node_id]
    assert not m.get(node.node_id).alive
    assert m.expire(now=5.0) == []  # reported once


def test_heartbeat_from_unknown_old_or_dead_node_asks_to_register():
    m = Membership(lease_ms=1000)
    node = m.register(SERVER, "h:1", now=0.0, node_id="server-abc123")
    assert not m.heartbeat("server-ffffff", 1, now=0.1)
    assert not m.heartbeat(node.node_id, 0, now=0.1)
    m.expire(now=2.0)
    assert not m.heartbeat(node.node_id, 1, now=2.1)
    assert not m.get(node.node_id).alive  # a refused heartbeat does not revive it


def test_reregistering_bumps_incarnation_and_revives():
    m = Membership(lease_ms=1000)
    node = m.register(SERVER, "h:1", now=0.0)
    m.expire(now=5.0)
    again = m.register(SERVER, "h:2", now=6.0, node_id=node.node_id)
    assert again.node_id == node.node_id
    assert again.incarnation == 2
    assert again.alive and again.address == "h:2"
    assert not m.heartbeat(node.node_id, 1, now=6.1)  # the old incarnation is fenced off
    assert m.heartbeat(node.node_id, 2, now=6.1)


def test_unknown_id_passed_at_register_is_kept():
    m = Membership(lease_ms=1000)
    node = m.register(SERVER, "h:1", now=0.0, node_id="server-0a0b0c")
    assert (node.node_id, node.incarnation) == ("server-0a0b0c", 1)


def test_shutting_down_heartbeat_marks_dead_at_once():
    m = Membership(lease_ms=1000)
    node = m.register(WORKER, "", now=0.0)
    assert m.heartbeat(node.node_id, 1, now=0.1, shutting_down=True)
    assert not m.get(node.node_id).alive
    assert m.alive() == []


@pytest.mark.parametrize("role, address, node_id, match", [
    (common_pb2.ROLE_UNSPECIFIED, "h:1", "", "role"),
    (SERVER, "", "", "address"),
    (WORKER, "", "server-abc123", "node_id"),
    (SERVER, "h:1", "server-../x", "node_id"),
])
def test_bad_registration_is_refused_and_stores_nothing(role, address, node_id, match):
    m = Membership(lease_ms=1000)
    with pytest.raises(ValueError, match=match):
        m.register(role, address, now=0.0, node_id=node_id)
    assert m.nodes() == []


def test_require_distinguishes_unknown_from_stale():
    m = Membership(lease_ms=1000)
    node = m.register(WORKER, "", now=0.0)
    assert m.require(node.node_id, 1) is node
    with pytest.raises(UnknownNodeError):
        m.require("worker-000000", 1)
    with pytest.raises(StaleNodeError, match="incarnation"):
        m.require(node.node_id, 7)
    m.expire(now=9.0)
    with pytest.raises(StaleNodeError, match="dead"):
        m.require(node.node_id, 1)


def test_alive_and_nodes_are_ordered_by_id_and_keep_the_dead():
    m = Membership(lease_ms=1000)
    m.register(WORKER, "", now=0.0, node_id="worker-bbbbbb")
    m.register(WORKER, "", now=0.0, node_id="worker-aaaaaa")
    m.register(SERVER, "h:1", now=0.5, node_id="server-cccccc")
    m.expire(now=1.2)
    assert [n.node_id for n in m.alive()] == ["server-cccccc"]
    assert [n.node_id for n in m.nodes()] == ["server-cccccc", "worker-aaaaaa", "worker-bbbbbb"]


def test_a_stall_of_the_coordinator_itself_does_not_count_against_leases():
    """Checks every 0.25 s; none ran from 1.0 to 4.0 (the coordinator starved or its lock
    held): heartbeats queued behind it could not land, so 2.75 s of the gap are not counted.
    The node's late heartbeat then renews it; a node that stays silent still expires, later."""
    m = Membership(lease_ms=1000, check_period_s=0.25)
    alive = m.register(WORKER, "", now=0.0)
    silent = m.register(WORKER, "", now=0.5)
    for t in (0.25, 0.5, 0.75):
        assert m.heartbeat(alive.node_id, 1, now=t) and m.expire(now=t) == []
    assert m.expire(now=1.0) == []
    assert m.expire(now=4.0) == []  # without the credit both would be dead here
    assert m.heartbeat(alive.node_id, 1, now=4.01)
    assert m.expire(now=4.25) == []
    assert [n.node_id for n in m.expire(now=4.5)] == [silent.node_id]  # 0.5 + 2.75 + lease, and past it
    assert [n.node_id for n in m.alive()] == [alive.node_id]


def test_regular_checks_credit_nothing():
    m = Membership(lease_ms=1000, check_period_s=0.25)
    node = m.register(WORKER, "", now=0.0)
    assert all(m.expire(now=0.25 * i) == [] for i in range(1, 5))  # 0.25 .. 1.0
    assert [n.node_id for n in m.expire(now=1.25)] == [node.node_id]
