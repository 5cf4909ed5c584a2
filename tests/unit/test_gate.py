"""runtime/gate.py on loopback sockets: the whole-opening deadline, the pending limit (the
busiest source's oldest out first), replies, and handoffs that leave what follows the opening
unread."""

import socket
import threading
import time

import pytest

from shardps.runtime import gate


def opening(data: bytes):
    """'HI' + one byte n, then n bytes: handed over; 'NO': refused with a reply."""
    if data[:2] == b"NO":
        return gate.Reply(b"refused")
    if len(data) < 3:
        return 3 - len(data)
    if len(data) < 3 + data[2]:
        return 3 + data[2] - len(data)
    return gate.Handoff(taken.append)


taken: list[socket.socket] = []


@pytest.fixture
def served():
    taken.clear()
    listener = socket.create_server(("127.0.0.1", 0))
    g = gate.Gate(listener, opening, name="test-gate", deadline_s=0.5, max_pending=4)
    g.start()
    yield g, listener.getsockname()[1]
    g.stop()
    for sock in taken:
        sock.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def closed(sock: socket.socket, within: float = 5.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(100) == b""
    except ConnectionError:
        return True


def test_an_opening_sent_at_once_is_handed_over_with_what_follows_unread(served):
    g, port = served
    with connect(port) as sock:
        sock.sendall(b"HI\x02abREST")
        deadline = time.monotonic() + 5
        while not taken and time.monotonic() < deadline:
            time.sleep(0.01)
        [conn] = taken
        assert conn.getblocking()
        conn.settimeout(5)
        assert conn.recv(4) == b"REST"
    assert g.pending == 0


def test_a_refusal_is_written_then_the_connection_closed(served):
    _, port = served
    with connect(port) as sock:
        sock.sendall(b"NO")
        assert sock.recv(100) == b"refused"
        assert closed(sock)


def test_an_opening_sent_a_byte_at_a_time_gets_one_deadline_for_all_of_it(served):
    g, port = served
    with connect(port) as sock:
        start = time.monotonic()
        sock.sendall(b"HI\x40")  # 64 more bytes wanted, then sent a byte every 0.1 s: no
        try:                      # single read waits 0.5 s, but the whole opening takes 6.4
            for _ in range(64):
                time.sleep(0.1)
                sock.sendall(b"x")
        except OSError:  # closed by the server
            pass
        assert closed(sock)
        assert time.monotonic() - start < 4
    assert g.expired >= 1 and not taken


def test_beyond_the_pending_limit_the_oldest_are_pushed_out_and_a_prompt_client_gets_in(served):
    g, port = served
    silent = [connect(port) for _ in range(10)]
    try:
        time.sleep(0.1)
        assert g.pending <= 4
        assert sum(closed(s, 0.2) for s in silent[:6]) == 6  # the oldest went first
        with connect(port) as sock:
            sock.sendall(b"HI\x00")
            deadline = time.monotonic() + 5
            while not taken and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(taken) == 1
    finally:
        for s in silent:
            s.close()
    assert g.dropped >= 6


def test_a_flooding_source_pushes_out_its_own_connections_not_another_sources(served):
    """Found closing issue 10: the oldest of all used to go, so a host opening connections
    fast pushed out another host's connection still in its opening."""
    g, port = served
    other = connect(port)  # 127.0.0.1, the oldest, and silent
    flood = [socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
             for _ in range(10)]
    try:
        deadline = time.monotonic() + 5
        while g.dropped < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert g.dropped == 7 and g.pending == 4
        assert sum(closed(s, 0.2) for s in flood[:7]) == 7
        other.sendall(b"HI\x00")  # still pending: it completes its opening
        deadline = time.monotonic() + 5
        while not taken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(taken) == 1
    finally:
        other.close()
        for s in flood:
            s.close()


@pytest.mark.parametrize("peer, source", [
    (("192.0.2.7", 5000), "192.0.2.7"),
    (("2001:db8:1:2:aaaa::1", 5000, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:2:bbbb::9%eth0", 5000, 0, 0), "2001:db8:1:2::/64"),
    (("::ffff:192.0.2.7", 5000, 0, 0), "192.0.2.7"),
    ("", ""),
])
def test_sources_are_ipv4_addresses_and_ipv6_slash_64s(peer, source):
    assert gate.source_of(peer) == source


def test_stop_closes_what_is_pending_and_the_listener():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    g = gate.Gate(listener, opening, name="test-gate", deadline_s=30)
    g.start()
    with connect(port) as sock:
        time.sleep(0.1)
        g.stop()
        assert closed(sock)
    assert not any(t.name == "test-gate" for t in threading.enumerate())
    with pytest.raises(OSError):
        connect(port)
