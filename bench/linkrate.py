"""linkrate: what one TCP stream moves across a host's link in bench/netns.py, by the kind of
link: a bare veth pair, a veth pair under tbf, and bench/tunlink.py's userspace link (a relay
process in Python) bare, at a 1 Gbit/s rate, with delay and with loss. Host b's link is
shaped; a sends to b and b to a. Needs root.

  python -m bench.linkrate               # 200 MB each way per row
  python -m bench.linkrate --small       # 8 MB each way per row

Mbit/s counts the payload from the first byte sent to the receiver's acknowledgement of the
last. The relay columns say how many frames b's link carried per MB (at most 64 KiB each:
the TAP devices take TCP segmentation offload), and relay_cpu_Mbit what it moved per second
of its own CPU time (user + system): its ceiling on a core of its own, however loaded the
machine is when measured.
"""

from __future__ import annotations

import os
import subprocess
import sys

from bench import netns, report

ROWS = {  # name: shape()'s arguments for host b
    "veth": {},
    "veth, tbf 1gbit": {"rate": "1gbit"},
    "userspace link": {"delay": "0ms"},
    "userspace link, 1gbit": {"rate": "1gbit", "delay": "0ms"},
    "userspace link, 1gbit, +5ms": {"rate": "1gbit", "delay": "5ms"},
    "userspace link, 1gbit, 0.1% loss": {"rate": "1gbit", "loss": "0.1%"},
}
# Sends N bytes to HOST:PORT; prints the seconds from the first byte to the sink's receipt.
SEND = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_connection((host, port), timeout=30) as s:
    s.settimeout(120)
    block = bytes(1 << 18)
    start = time.monotonic()
    for _ in range(n // len(block)):
        s.sendall(block)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b"k"
    print(time.monotonic() - start)
"""
# Listens on HOST:0, prints its port, receives until EOF and acknowledges with one byte.
SINK = """
import socket, sys
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)
listener.settimeout(60)
conn, _ = listener.accept()
conn.settimeout(120)
while conn.recv(1 << 20):
    pass
conn.sendall(b"k")
"""


def mbits(net: netns.Network, src: str, dst: str, nbytes: int) -> float:
    """One stream's payload rate src -> dst, Mbit/s."""
    sink = net.popen(dst, sys.executable, "-c", SINK, net.address(dst), stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        port = sink.stdout.readline().strip()
        sent = net.run(src, sys.executable, "-c", SEND, net.address(dst), port, str(nbytes), timeout=300)
        if sink.wait(60) != 0:
            raise RuntimeError(f"the sink on {dst} exited {sink.returncode}")
        return nbytes * 8 / float(sent.stdout) / 1e6
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process pid so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = report.parser(__doc__, "8 MB each way per row")
    parser.add_argument("--mbytes", type=int, default=200, help="MB sent each way per row (default 200)")
    args = parser.parse_args()
    if args.small:
        args.mbytes = 8
    if why := netns.why_unavailable():
        parser.error(f"network namespaces unavailable: {why}")
    nbytes = args.mbytes << 20
    table = report.Table(f"linkrate: one TCP stream across b's link, {args.mbytes} MB each way (Mbit/s)",
                         ["link", "a_to_b_Mbit", "b_to_a_Mbit", "frames_per_MB", "lost", "relay_cpu_Mbit"])
    with netns.Network(["a", "b"]) as net:
        for name, shaping in ROWS.items():
            net.shape("b", **shaping)
            net.wait_reachable("a", "b")
            link = net.link("b")
            cpu = cpu_seconds(link.proc.pid) if link is not None else 0.0
            row = {"link": name, "a_to_b_Mbit": mbits(net, "a", "b", nbytes),
                   "b_to_a_Mbit": mbits(net, "b", "a", nbytes)}
            if link is not None:
                counters = link.stats()
                frames = counters["ab"]["offered"] + counters["ba"]["offered"]
                row["frames_per_MB"] = frames / (2 * args.mbytes)
                row["lost"] = counters["ab"]["lost"]
                row["relay_cpu_Mbit"] = 2 * nbytes * 8 / max(1e-3, cpu_seconds(link.proc.pid) - cpu) / 1e6
            table.add(**row)
            print(table.rows[-1], flush=True)
            net.unshape("b")
    report.write("linkrate", [table], vars(args), out_dir=args.out_dir)


if __name__ == "__main__":
    main()
