"""Membership: which servers and workers exist, their incarnations and whose lease is current.

Pure core: no gRPC, no clock of its own; every call that depends on time takes `now`
(monotonic seconds).
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field

from shardps.proto import common_pb2, names

log = logging.getLogger(__name__)

ROLE_PREFIXES = {common_pb2.ROLE_SERVER: "server", common_pb2.ROLE_WORKER: "worker"}
# Within the identifier rule of proto/names.py; matched in full (`$` also matches before a
# trailing newline).
_NODE_ID = re.compile(r"(server|worker)-[0-9a-z]{1,32}")


class UnknownNodeError(LookupError):
    """A node id the coordinator has never seen (servicer: NOT_FOUND)."""


class StaleNodeError(Exception):
    """A known node calling with an old incarnation, or after it was declared dead
    (servicer: FAILED_PRECONDITION; the node must register again)."""


@dataclass
class Node:
    """One registered daemon. Owned by its Membership; callers must not mutate it."""

    node_id: str
    role: common_pb2.Role
    address: str
    incarnation: int
    last_seen: float  # monotonic seconds of the last register/heartbeat
    alive: bool = True
    metrics_address: str = ""
    device: str = ""
    hostname: str = ""
    # servers: (job id, shard index) of every checkpoint in its data dir, as it registered
    stored: list[tuple[str, int]] = field(default_factory=list)

    @property
    def role_name(self) -> str:
        return ROLE_PREFIXES.get(self.role, "unknown")


class Membership:
    """The node table with leases.

    Not thread-safe: the owner (the servicer) calls it under its own lock.

    Args:
        lease_ms: a node whose last heartbeat is older than this is dead.
        check_period_s: how often the owner checks leases (the daemon's sweeper); with it, a
            longer gap between two checks is a stall of the coordinator itself (its process
            starved of CPU or paused, its lock held), during which heartbeats could not reach
            it, and leases do not count the stall. None: every second counts (tests that
            drive the clock themselves).
    """

    def __init__(self, lease_ms: int, check_period_s: float | None = None):
        if lease_ms <= 0:
            raise ValueError(f"lease_ms must be > 0, got {lease_ms}")
        self.lease_ms = int(lease_ms)
        self._nodes: dict[str, Node] = {}
        self._hold_until = float("-inf")  # no lease expires before this (after a restart)
        self._check_period_s = check_period_s
        self._last_check: float | None = None

    def register(self, role: common_pb2.Role, address: str, now: float, node_id: str = "",
                 metrics_address: str = "", device: str = "", hostname: str = "",
                 stored: list[tuple[str, int]] | None = None) -> Node:
        """Adds a node, or re-registers a known id with a higher incarnation.

        A node that passes an id the coordinator does not know (e.g. a server whose data dir
        survived a coordinator restart) keeps that id, starting at incarnation 1.

        Raises:
            ValueError: unknown role, a server without an address, or a malformed id or one
                registered under the other role.
        """
        if role not in ROLE_PREFIXES:
            raise ValueError(f"role must be ROLE_SERVER or ROLE_WORKER, got {role}")
        prefix = ROLE_PREFIXES[role]
        if role == common_pb2.ROLE_SERVER and not address:
            raise ValueError("address: a server must give the host:port it serves on")
        if node_id and (not _NODE_ID.fullmatch(node_id) or not node_id.startswith(prefix + "-")):
            raise ValueError(f"node_id: {names.shown(node_id)} is not a {prefix} id "
                             f"({prefix}-<hex>)")
        node = self._nodes.get(node_id) if node_id else None
        if node is None:
            node = Node(node_id or self._new_id(prefix), role, address, 1, now)
            self._nodes[node.node_id] = node
            log.info("node %s registered (%s, incarnation 1)", node.node_id, address or "-")
        else:
            node.incarnation += 1
            log.info("node %s re-registered (%s, incarnation %d)", node.node_id, address or "-",
                     node.incarnation)
        node.address = address
        node.last_seen = now
        node.alive = True
        node.metrics_address = metrics_address
        node.device = device
        node.hostname = hostname
        node.stored = list(stored or [])
        return node

    def load(self, nodes: list[Node], now: float, grace_s: float = 0.0) -> None:
        """Takes over a saved node table (coordinator restart); the table must be empty.

        No lease expires before `now + lease + grace_s`: daemons that were retrying an
        unreachable coordinator with backoff get time to find it back.
        """
        assert not self._nodes, "load into an empty Membership"
        self._nodes = {n.node_id: n for n in nodes}
        self._hold_until = now + self.lease_ms / 1000.0 + grace_s

    def heartbeat(self, node_id: str, incarnation: int, now: float,
                  shutting_down: bool = False) -> bool:
        """Renews a lease. False means the node must register again (unknown id, old
        incarnation, or already declared dead); nothing changes then.

        A heartbeat with shutting_down marks the node dead at once (and still answers True).
        """
        node = self._nodes.get(node_id)
        if node is None or node.incarnation != incarnation or not node.alive:
            return False
        node.last_seen = now
        if shutting_down:
            node.alive = False
            log.info("node %s shut down", node_id)
        return True

    def expire(self, now: float) -> list[Node]:
        """Declares dead every alive node whose lease ran out; returns those, each once."""
        lease_s = self.lease_ms / 1000.0
        self._credit_stall(now)
        if now < self._hold_until:
            return []
        dead = [n for n in self._nodes.values() if n.alive and now - n.last_seen > lease_s]
        for node in dead:
            node.alive = False
            log.info("node %s expired (no heartbeat for %.1f s)", node.node_id,
                     now - node.last_seen)
        return dead

    def _credit_stall(self, now: float) -> None:
        """Moves every alive node's last heartbeat on by the time no check ran beyond one
        period, when that was more than a period: a lease then expires later than it would
        have, never sooner (a primary fences itself on its own clock either way)."""
        last, self._last_check = self._last_check, now
        if self._check_period_s is None or last is None:
            return
        stalled = now - last - self._check_period_s
        if stalled <= self._check_period_s:
            return
        for node in self._nodes.values():
            if node.alive:
                node.last_seen = min(now, node.last_seen + stalled)
        log.warning("no lease was checked for %.1f s (this coordinator stalled): the leases "
                    "do not count %.1f s of it", now - last, stalled)

    def require(self, node_id: str, incarnation: int) -> Node:
        """The node, if it is alive at this incarnation.

        Raises:
            UnknownNodeError: never registered.
            StaleNodeError: an old incarnation, or declared dead.
        """
        node = self.get(node_id)
        if node.incarnation != incarnation:
            raise StaleNodeError(f"node {node_id} is at incarnation {node.incarnation}, "
                                 f"not {incarnation}; register again")
        if not node.alive:
            raise StaleNodeError(f"node {node_id} was declared dead; register again")
        return node

    def current(self, node_id: str, incarnation: int) -> bool:
        """True if the node is alive at this incarnation (what `require` checks), without raising."""
        node = self._nodes.get(node_id)
        return node is not None and node.incarnation == incarnation and node.alive

    def get(self, node_id: str) -> Node:
        """Raises UnknownNodeError for an id never registered."""
        node = self._nodes.get(node_id)
        if node is None:
            raise UnknownNodeError(f"unknown node {names.shown(node_id)}")
        return node

    def find(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)

    def alive(self, role: int | None = None) -> list[Node]:
        """Alive nodes (of one role, if given), ordered by id."""
        return [n for n in self.nodes() if n.alive and (role is None or n.role == role)]

    def nodes(self) -> list[Node]:
        """Every node ever registered, alive or dead, ordered by id."""
        return sorted(self._nodes.values(), key=lambda n: n.node_id)

    def _new_id(self, prefix: str) -> str:
        while True:
            node_id = f"{prefix}-{secrets.token_hex(3)}"
            if node_id not in self._nodes:
                return node_id
