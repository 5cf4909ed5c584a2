"""The network harness (bench/netns.py) on real namespaces, veth pairs and tc, its userspace
links (bench/tunlink.py: delay, loss, cut), and a shardps cluster spread over three emulated
hosts. Needs root and iproute2; skipped otherwise."""

import contextlib
import json
import re
import subprocess
import sys

import pytest

from bench import linkrate, netns, tunlink
from bench.linkrate import SEND  # N bytes to HOST:PORT; prints the seconds to the sink's ack
from tests import harness

_why = netns.why_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"network namespaces unavailable: {_why}")

# Listens on HOST:0, prints its port, receives until EOF and acknowledges with one byte.
SINK = """
import hashlib, socket, sys
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)
listener.settimeout(60)
conn, _ = listener.accept()
conn.settimeout(60)
digest = hashlib.sha256()
while data := conn.recv(1 << 20):
    digest.update(data)
conn.sendall(b"k")
print(digest.hexdigest())
"""
# Sends N seeded random bytes to HOST:PORT and prints their sha256 once the receiver has
# acknowledged all of them.
SEND_RANDOM = """
import hashlib, random, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(7).randbytes(n)
with socket.create_connection((host, port), timeout=30) as s:
    s.settimeout(60)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b"k"
print(hashlib.sha256(data).hexdigest())
"""
# Echoes one connection's bytes back (prints its port first).
ECHO = """
import socket, sys
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)
listener.settimeout(60)
conn, _ = listener.accept()
conn.settimeout(60)
while data := conn.recv(1 << 16):
    conn.sendall(data)
"""
# Prints the seconds a TCP connect to HOST:PORT took, then the seconds one byte took to come
# back from an echo.
ROUND_TRIPS = """
import socket, sys, time
start = time.monotonic()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    connected = time.monotonic()
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    print(connected - start, time.monotonic() - connected)
"""


@pytest.fixture
def net():
    with netns.Network(["a", "b", "c"]) as made:
        yield made
    assert not [ns for ns in netns.namespaces() if ns.startswith(made.hub.removesuffix("hub"))]


def test_hosts_reach_each_other_on_their_own_addresses(net):
    assert net.address("a") == "10.199.0.1" and net.address("c") == "10.199.0.3"
    for src, dst in (("a", "b"), ("b", "c"), ("c", "a")):
        assert net.reaches(src, dst)
    shown = net.run("b", "ip", "-4", "addr", "show", "dev", "eth0").stdout
    assert "10.199.0.2/24" in shown


def test_namespaces_do_not_see_the_machines_loopback_services(net):
    # A listener on the machine's own 127.0.0.1 is not reachable from inside a host.
    listener = __import__("socket").create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
    with listener:
        assert net.run("a", sys.executable, "-c", probe, check=False).returncode != 0


@contextlib.contextmanager
def _serving(net, host: str, script: str):
    """Runs a server script (SINK, ECHO) on host; yields it and the port it printed."""
    server = net.popen(host, sys.executable, "-c", script, net.address(host), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        yield server, server.stdout.readline().strip()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def _send(net, src: str, dst: str, sender: str, nbytes: int) -> tuple[str, str]:
    """Runs sender (SEND, SEND_RANDOM) on src into a SINK on dst; returns what each printed."""
    with _serving(net, dst, SINK) as (sink, port):
        sent = net.run(src, sys.executable, "-c", sender, net.address(dst), port, str(nbytes), timeout=120)
        received, _ = sink.communicate(timeout=30)
        assert sink.returncode == 0
        return sent.stdout.strip(), received.strip()


@pytest.mark.parametrize("emulated", [False, True], ids=["tbf", "userspace link"])
def test_a_shaped_link_moves_data_no_faster_than_its_rate(net, emulated):
    net.shape("b", rate="100mbit", delay="0ms" if emulated else None)
    if not emulated:
        for ns, dev in ((net.ns("b"), "eth0"), (net.hub, "p1")):
            assert "tbf" in net.qdiscs(ns, dev) and "rate 100Mbit" in net.qdiscs(ns, dev)
    else:
        assert net.link("b") is not None and "tun type tap" in net.run("b", "ip", "-d", "link", "show", "eth0").stdout
    nbytes = 8 << 20  # 0.67 s at 100 Mbit/s
    for src, dst in (("a", "b"), ("b", "a")):  # both directions are limited
        seconds = float(_send(net, src, dst, SEND, nbytes)[0])
        # A generous bound: the bucket's burst (64 KiB) is under 1% of the transfer.
        assert nbytes * 8 / seconds < 1.3 * 100e6, f"{src}->{dst}: {nbytes * 8 / seconds / 1e6:.0f} Mbit/s"
    net.unshape("b")
    assert "tbf" not in net.qdiscs(net.ns("b")) and "tbf" not in net.qdiscs(net.hub, "p1")
    assert net.link("b") is None and "veth" in net.run("b", "ip", "-d", "link", "show", "eth0").stdout
    assert net.reaches("a", "b")


def test_delayed_links_add_both_delays_to_every_round_trip(net):
    net.shape("a", delay="20ms")
    net.shape("c", delay="20ms", jitter="5ms")
    with _serving(net, "c", ECHO) as (_, port):
        out = net.run("a", sys.executable, "-c", ROUND_TRIPS, net.address("c"), port).stdout.split()
    connect_s, echo_s = map(float, out)
    # The SYN leaves a 20 ms late (and its ARP before it), the SYN-ACK leaves c 15-25 ms late.
    assert connect_s >= 0.035 and echo_s >= 0.035, out
    assert net.link("a").stats()["ab"]["delivered"] >= 3  # type: ignore[union-attr]
    assert net.reaches("b", "a") and net.reaches("c", "b")  # b's own link is untouched


def test_a_lossy_link_delivers_a_megabyte_intact_with_retransmits(net):
    net.shape("b", loss="5%", seed=1)  # seed 1 drops the 10th, 14th, 20th and 21st frame b sends
    link = net.link("b")
    assert link is not None

    def retransmits() -> int:  # b's kernel TCP counter (RetransSegs), in b's namespace
        lines = [line.split() for line in net.run("b", "cat", "/proc/net/snmp").stdout.splitlines()
                 if line.startswith("Tcp:")]
        return int(lines[1][lines[0].index("RetransSegs")])

    before, retransmitted = link.stats()["ab"], retransmits()
    sent, received = _send(net, "b", "a", SEND_RANDOM, 1 << 20)
    assert sent == received and len(sent) == 64  # the same sha256 on both sides
    after = link.stats()["ab"]
    assert after["lost"] > before["lost"], after
    assert after["delivered"] + after["lost"] + after["write_errors"] + after["queued"] == after["offered"]
    assert retransmits() > retransmitted


def test_a_userspace_links_cut_stops_traffic_and_heal_restores_it(net):
    net.shape("b", delay="1ms")
    link = net.link("b")
    assert link is not None and net.reaches("a", "b")
    link.cut()
    assert not net.reaches("a", "b") and not net.reaches("b", "c")
    assert net.reaches("a", "c")
    stats = link.stats()
    assert stats["ab"]["cut_now"] and stats["ab"]["cut"] >= 1 and stats["ba"]["cut"] >= 1
    link.heal()
    net.wait_reachable("a", "b")
    net.cut("b")  # the link-down cut works on the TAP device too
    assert not net.reaches("c", "b")
    net.heal("b")
    net.wait_reachable("c", "b")


def test_bad_shaping_arguments_are_refused_before_touching_the_link(net):
    net.shape("a", rate="200mbit")
    for bad, message in ((dict(rate="100mbps"), "rate '100mbps'"), (dict(delay="20"), "delay '20'"),
                         (dict(jitter="1min"), "jitter '1min'"), (dict(loss="100%"), "loss '100%'"),
                         (dict(loss="0.02"), "loss '0.02'"), (dict(delay="61s"), "delay_ms 61000")):
        with pytest.raises(ValueError, match=message):
            net.shape("a", **bad)
        assert "rate 200Mbit" in net.qdiscs(net.ns("a")) and net.link("a") is None  # still as before
    with pytest.raises(KeyError, match="no host 'z'"):
        net.shape("z", rate="1gbit")


def test_a_cut_host_reaches_no_one_and_heals(net):
    net.cut("b")
    assert not net.reaches("a", "b") and not net.reaches("b", "c")
    assert net.reaches("a", "c")  # the others are untouched
    net.heal("b")
    net.wait_reachable("a", "b")
    assert net.reaches("b", "c")


def test_a_killed_relay_takes_its_devices_with_it_and_bad_endpoints_are_refused(net):
    net.shape("c", delay="1ms")
    link = net.link("c")
    assert link is not None
    with pytest.raises(tunlink.TunlinkError, match="unknown command 'reboot'"):
        link._ask("reboot")
    assert "eth0" in _devices(net.run("c", "ip", "-o", "link", "show").stdout)
    assert "p2" in _devices(_in_hub(net, "ip", "-o", "link", "show"))
    link.proc.kill()
    link.proc.wait(10)
    # Not persistent: both TAP devices went with the process that held them.
    harness.poll(lambda: "eth0" not in _devices(net.run("c", "ip", "-o", "link", "show").stdout), 10,
                 what="c's eth0 gone")
    assert "p2" not in _devices(_in_hub(net, "ip", "-o", "link", "show"))  # nor its bridge port
    with pytest.raises(tunlink.TunlinkError, match="relay exited"):
        link.stats()
    with pytest.raises(tunlink.TunlinkError, match="no-such-namespace"):
        tunlink.Link(("no-such-namespace", "eth0"), (net.ns("a"), "x0"))
    assert "x0" not in _devices(net.run("a", "ip", "-o", "link", "show").stdout)
    net.unshape("c")  # back to a veth pair
    net.wait_reachable("a", "c")


def _devices(ip_o_link: str) -> list[str]:
    """Device names in `ip -o link show` output ("3: eth0@if4: <...>" -> "eth0")."""
    return [re.split(r"[:@]", line.split(": ", 1)[1])[0] for line in ip_o_link.splitlines() if ": " in line]


def _in_hub(net, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", net.hub, *args], capture_output=True, text=True,
                          timeout=20, check=True).stdout


def test_close_kills_what_runs_inside_and_removes_every_namespace():
    net = netns.Network(["x", "y"])
    made = [net.hub, net.ns("x"), net.ns("y")]
    sleeper = net.popen("x", "sleep", "600")
    net.shape("y", delay="5ms")
    relay = net.link("y").proc  # type: ignore[union-attr]
    assert set(made) <= set(netns.namespaces())
    net.close()
    assert sleeper.wait(10) != 0
    assert relay.returncode == 0  # stopped and reaped
    assert not set(made) & set(netns.namespaces())
    net.close()  # twice is fine


def test_sweep_removes_namespaces_left_by_a_dead_process():
    code = "from bench import netns; import os; n = netns.Network(['q']); print(n.hub, flush=True); os._exit(0)"
    left = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    hub = left.stdout.strip()
    assert hub in netns.namespaces()  # os._exit skipped its cleanup
    swept = netns.sweep()
    assert hub in swept and hub.replace("hub", "q") in swept
    assert hub not in netns.namespaces()


def test_invalid_host_names_are_refused():
    with pytest.raises(ValueError, match="host name 'Bad_Name'"):
        netns.Network(["Bad_Name"])
    with pytest.raises(ValueError, match="distinct"):
        netns.Network(["a", "a"])


def test_a_digits_job_runs_to_completion_across_three_hosts(net, tmp_path):
    """Coordinator on a, a server on b, a worker on c: every byte crosses the emulated switch."""
    net.shape("b", rate="1gbit")
    net.shape("c", rate="1gbit")
    a, b, c = (net.address(h) for h in ("a", "b", "c"))
    coord = harness.start("shardps-coordinator", "--host", a, "--port", "0", "--lease-ms", "3000",
                          prefix=net.command("a"))
    assert coord.address.startswith(f"{a}:")
    server = harness.start("shardps-server", "--host", b, "--port", "0", "--coordinator", coord.address,
                           prefix=net.command("b"))
    worker = harness.start("shardps-worker", "--host", c, "--port", "0", "--coordinator", coord.address,
                           "--threads", "1", prefix=net.command("c"))
    assert server.address.startswith(f"{b}:") and worker.address.startswith(f"{c}:")
    spec = tmp_path / "job.yaml"
    spec.write_text("name: netns-digits\nseed: 0\nmodel: {name: mlp, kwargs: {hidden: [32]}}\n"
                    "data: {dataset: digits, batch_size: 64}\noptimizer: {lr: 0.01}\n"
                    "cluster: {servers: 1, workers: 1}\nstop: {max_steps: 60, eval_every: 30}\n")
    shardps = [*harness.script("shardps")]
    submitted = net.run("a", *shardps, "submit", str(spec), "--coordinator", coord.address, "--output",
                        "json", timeout=120)
    job_id = json.loads(submitted.stdout)["job_id"]

    def final():
        out = net.run("a", *shardps, "status", job_id, "--coordinator", coord.address, "--output", "json",
                      timeout=60)
        info = json.loads(out.stdout)
        return info if info["state"] in ("JOB_STATE_COMPLETED", "JOB_STATE_CONVERGED", "JOB_STATE_FAILED") else None

    info = harness.poll(final, timeout=300, interval=0.5, what="job final")
    assert info["state"] == "JOB_STATE_COMPLETED", info
    assert info["metric"] == "accuracy" and info["metric_value"] > 0.8
    for daemon in (worker, server, coord):
        assert daemon.stop() == 0, daemon.output()


# bench.net --small in three runs of three systems (each a test, so the test processes share
# them out): all nine took 81 s alone on a quiet machine and up to 225 s in a loaded suite.
DDP_ROWS = ["DDP gloo fp32", "DDP fp16_compress_hook", "DDP powerSGD_hook (rank 1)"]
PS_ROWS = ["shardps fp32 (2 servers)", "shardps fp32 overlap (2 servers)", "shardps int8+EF both ways (2 servers)"]
SIGN_ROWS = ["shardps sign+momentum push; int8 pull (2 servers)",
             "shardps sign+momentum push; sign:32 pull (2 servers)",
             "shardps sign+momentum push; fp32 pull (2 servers)"]


def small_net(tmp_path, systems: list[str]) -> tuple[list[float], list[dict]]:
    """Runs bench.net --small on `systems`; checks it made one row each, in order, and left
    no namespace; returns their wire MB per step, and the rows."""
    with subprocess.Popen([sys.executable, "-m", "bench.net", "--small", "--out-dir", str(tmp_path),
                           "--systems", ",".join(systems)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as bench:
        try:
            stdout, stderr = bench.communicate(timeout=500)
        finally:
            bench.kill()  # a no-op once it exited
    assert bench.returncode == 0, stdout[-3000:] + stderr[-3000:]
    rows = next(iter(json.loads((tmp_path / "net.json").read_text())["tables"].values()))
    assert [r["system"] for r in rows] == systems
    # Its own namespaces, by their names' prefix (netns.Network): other tests running at the
    # same time make and remove theirs.
    assert not [ns for ns in netns.namespaces() if ns.startswith(f"{netns.PREFIX}{bench.pid}x")]
    return [r["wire_MB_per_step"] for r in rows], rows


def fp32_mb_per_step() -> float:
    """What the --small MLP's fp32 gradient and weights are, in MB: one push and one pull."""
    from bench.step import mlp
    model, _ = mlp(80_000)
    return 2 * 4 * sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.timeout(560)
def test_bench_net_runs_its_ddp_rows_in_the_small_configuration(tmp_path):
    """bench.net --small, DDP's rows, end to end (no timing asserted)."""
    (fp32, fp16, _), rows = small_net(tmp_path, DDP_ROWS)
    assert rows[0]["vs_ddp_fp32"] == 1.0
    assert 0.4 * fp32 < fp16 < 0.7 * fp32  # half the bytes, give or take headers


@pytest.mark.timeout(560)
def test_bench_net_runs_its_dense_and_int8_shardps_rows_in_the_small_configuration(tmp_path):
    (ps32, overlapped, ps8), _ = small_net(tmp_path, PS_ROWS)
    fp32 = fp32_mb_per_step()
    assert 0.9 * fp32 < ps32 < 1.25 * fp32  # the elements, and headers
    assert 0.8 * ps32 < overlapped < 1.25 * ps32  # the same bytes, in pieces
    assert 0.2 * ps32 < ps8 < 0.4 * ps32  # a quarter of the bytes, give or take headers


@pytest.mark.timeout(560)
def test_bench_net_runs_its_sign_shardps_rows_in_the_small_configuration(tmp_path):
    (sign8, sign32, fp32_pull), _ = small_net(tmp_path, SIGN_ROWS)
    fp32 = fp32_mb_per_step()  # about 0.67 MB: 84K parameters
    assert sign32 < sign8 < 0.25 * fp32  # 0.033 and 0.097 MB; int8 both ways is a quarter of fp32
    assert 0.45 * fp32 < fp32_pull < 0.75 * fp32  # fp32 pulls: about half of fp32's bytes


def test_bench_linkrate_runs_in_its_small_configuration(tmp_path):
    """bench.linkrate --small end to end (no rate asserted): every row, the relay's frames are
    offloaded segments (far fewer than 1500-byte packets would be), and no namespace left."""
    done = subprocess.run([sys.executable, "-m", "bench.linkrate", "--small", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = next(iter(json.loads((tmp_path / "linkrate.json").read_text())["tables"].values()))
    assert [r["link"] for r in rows] == list(linkrate.ROWS)
    assert all(r["a_to_b_Mbit"] > 0 and r["b_to_a_Mbit"] > 0 for r in rows)
    relayed = [r for r in rows if r["link"].startswith("userspace")]
    assert len(relayed) == 4 and all(r["frames_per_MB"] < 350 for r in relayed)  # 1500-byte: 700 per MB
    assert all(r["relay_cpu_Mbit"] > 0 for r in relayed)
