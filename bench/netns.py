"""Emulated hosts on one machine: network namespaces joined to a bridge by veth pairs, each
host's link shaped (rate, delay, jitter, loss), cut and healed at will. Used by bench/net.py
and tests/e2e.

  with Network(["a", "b", "c"]) as net:
      net.shape("b", rate="100mbit", delay="5ms", loss="1%")
      net.run("a", "ping", "-c", "1", net.address("b"))

Topology: a hub namespace holds a bridge; each host is a namespace whose `eth0` is one end of
a veth pair, the other end a port of that bridge. Hosts get 10.199.0.1, .2, ... (/24), an
address range that only ever exists inside these namespaces, so it cannot clash with the
machine's own networks. A rate alone is a tbf on both ends of the veth pair. Delay, jitter or
loss replace the host's veth pair by a userspace link (bench/tunlink.py: a TAP device at each
end and a relay process between them; kernels here lack netem), whose rate limits both
directions and whose delay, jitter and loss apply to what the host sends, so a round trip
between two hosts sees both of their delays.

Everything made is removed by `close()` (also on `with` exit and at interpreter exit), and
`sweep()` removes namespaces that an earlier process of ours left behind (name prefix
`sps<pid>x<n>-`, pid no longer running). Needs root and iproute2.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from bench import tunlink
from shardps.runtime.daemon import pid_alive

PREFIX = "sps"
SUBNET = "10.199.0"
MAX_HOSTS = 200
COMMAND_TIMEOUT_S = 20.0
_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_OURS = re.compile(rf"^{PREFIX}(\d+)x\d+-[a-z0-9]+$")
_count = itertools.count()


# Exit 0 when the peer answers on port 9 (discard): refused is an answer too; 1 on timeout
# or no route.
_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=1).close()
except ConnectionRefusedError:
    pass
except OSError:
    sys.exit(1)
"""


class NetnsError(RuntimeError):
    """An `ip`/`tc` command failed; the message holds the command and its stderr."""


def _ip(*args: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _in(ns: str, *args: str) -> str:
    """Runs `ip`/`tc` inside namespace ns and returns its stdout."""
    return _ip("netns", "exec", ns, *args)


def why_unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): not root, or no `ip netns`."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    try:
        _ip("netns", "list")
    except (NetnsError, OSError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


def namespaces() -> list[str]:
    """Every namespace on the machine, by name."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _delete_namespace(ns: str) -> None:
    """Kills what still runs inside ns (only our own children are ever there), then deletes it."""
    try:
        pids = _ip("netns", "pids", ns).split()
    except NetnsError:
        pids = []
    for pid in pids[:1000]:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    try:
        _ip("netns", "delete", ns)
    except NetnsError:
        if ns in namespaces():
            raise


def sweep() -> list[str]:
    """Deletes namespaces named by a process of ours that is gone; returns their names."""
    stale = [ns for ns in namespaces() if (m := _OURS.match(ns)) and not pid_alive(int(m.group(1)))]
    for ns in stale:
        _delete_namespace(ns)
    return stale


def _burst_bytes(rate_bits: int) -> int:
    # 5 ms worth of bytes, at least 64 KiB so a single TSO segment always fits the bucket.
    return max(64 * 1024, rate_bits // 8 // 200)


def parse_rate(rate: str) -> int:
    """tc's rate syntax in bits per second: '100mbit' -> 100_000_000, '1gbit', '500kbit'."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit|bit)", rate.strip().lower())
    if not m:
        raise ValueError(f"rate {rate!r}: expected e.g. 100mbit, 1gbit or 500kbit")
    scale = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}[m.group(2)]
    return int(float(m.group(1)) * scale)


def parse_delay_ms(delay: str, what: str = "delay") -> float:
    """tc's time syntax in milliseconds: '20ms' -> 20.0, '500us' -> 0.5, '1s' -> 1000.0."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s)", delay.strip().lower())
    if not m:
        raise ValueError(f"{what} {delay!r}: expected e.g. 20ms, 500us or 1s")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def parse_loss(loss: str) -> float:
    """tc's loss syntax as a probability: '2%' -> 0.02."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", loss.strip())
    if not m or float(m.group(1)) >= 100:
        raise ValueError(f"loss {loss!r}: expected a percentage under 100%, e.g. 2% or 0.1%")
    return float(m.group(1)) / 100


def _mac(index: int) -> str:
    """Host index's fixed MAC address: a host keeps it when its veth is swapped for a TAP, so
    its neighbours' ARP entries stay right."""
    return f"02:53:00:00:{index >> 8:02x}:{index & 0xff:02x}"


class Network:
    """Hosts (namespaces) on one emulated switch. Not thread-safe; the creating thread owns it.

    Namespace names are `sps<pid>x<n>-<host>`; host names are 1-8 lowercase letters or digits.
    """

    def __init__(self, hosts: Sequence[str]):
        if not 1 <= len(hosts) <= MAX_HOSTS or len(set(hosts)) != len(hosts):
            raise ValueError(f"expected 1 to {MAX_HOSTS} distinct host names, got {list(hosts)}")
        for host in hosts:
            if not _NAME.match(host) or host == "hub":
                raise ValueError(f"host name {host!r}: 1-8 lowercase letters or digits, not 'hub'")
        self.hosts = list(hosts)
        self._prefix = f"{PREFIX}{os.getpid()}x{next(_count)}-"
        self.hub = self._prefix + "hub"
        self._made: list[str] = []
        self._links: dict[str, tunlink.Link] = {}  # host: the userspace link replacing its veth
        self._closed = False
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        sweep()
        self._add_namespace(self.hub)
        _in(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        _in(self.hub, "ip", "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_namespace(self.ns(host))
            self._add_veth(host)

    def _add_veth(self, host: str) -> None:
        _ip("link", "add", "eth0", "netns", self.ns(host), "type", "veth", "peer", "name", self._port(host),
            "netns", self.hub)
        self._attach(host)

    def _attach(self, host: str) -> None:
        """Puts host's link (a veth pair or a TAP pair, both ends just made) on the switch: the
        hub's end a bridge port, the host's end eth0 with the host's address and MAC."""
        ns, i = self.ns(host), self.hosts.index(host)
        _in(self.hub, "ip", "link", "set", self._port(host), "master", "br0")
        _in(self.hub, "ip", "link", "set", self._port(host), "up")
        _in(ns, "ip", "link", "set", "eth0", "address", _mac(i + 1))
        _in(ns, "ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
        _in(ns, "ip", "link", "set", "eth0", "up")

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _in(ns, "ip", "link", "set", "lo", "up")

    def ns(self, host: str) -> str:
        """The namespace name of host."""
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} in {self.hosts}")
        return self._prefix + host

    def _port(self, host: str) -> str:
        return f"p{self.hosts.index(host)}"

    def address(self, host: str) -> str:
        """host's IPv4 address on the switch."""
        self.ns(host)
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    # -- links --

    def shape(self, host: str, rate: str | None = None, delay: str | None = None,
              loss: str | None = None, jitter: str | None = None, seed: int = 0) -> None:
        """Limits host's link to rate in each direction; delays (delay like '5ms', give or take
        jitter) or drops (loss like '1%', seeded) what it sends. A rate alone is a tbf; any of
        delay, jitter or loss puts a userspace link (bench/tunlink.py) in place of host's veth
        pair, which then also keeps the rate. Replaces earlier shaping of that host and brings
        its link up."""
        ns = self.ns(host)
        bits = parse_rate(rate) if rate else 0  # bad input is refused before anything changes
        emulated = delay is not None or loss is not None or jitter is not None
        out = tunlink.Spec(delay_ms=parse_delay_ms(delay) if delay else 0.0,
                           jitter_ms=parse_delay_ms(jitter, "jitter") if jitter else 0.0,
                           loss=parse_loss(loss) if loss else 0.0, rate_bits=bits)
        self.unshape(host)
        if emulated:
            _in(ns, "ip", "link", "del", "eth0")  # its peer, the bridge port, goes with it
            try:
                self._links[host] = tunlink.Link((ns, "eth0"), (self.hub, self._port(host)), ab=out,
                                                 ba=tunlink.Spec(rate_bits=bits), seed=seed)
            except tunlink.TunlinkError:
                self._add_veth(host)  # the host keeps a link, unshaped
                raise
            self._attach(host)
        elif bits:
            tbf = ["tbf", "rate", f"{bits}bit", "burst", str(_burst_bytes(bits)), "latency", "100ms"]
            _in(ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf)
            _in(self.hub, "tc", "qdisc", "add", "dev", self._port(host), "root", *tbf)

    def unshape(self, host: str) -> None:
        """Removes host's shaping (both directions; a userspace link goes back to a veth pair);
        a no-op when it has none."""
        if (link := self._links.pop(host, None)) is not None:
            link.close()  # its TAP devices go with the relay
            self._add_veth(host)
            return
        for ns, dev in ((self.ns(host), "eth0"), (self.hub, self._port(host))):
            if "qdisc tbf" in self.qdiscs(ns, dev):
                _in(ns, "tc", "qdisc", "del", "dev", dev, "root")

    def link(self, host: str) -> tunlink.Link | None:
        """The userspace link in place of host's veth pair (its counters, its own cut switch),
        or None when host has none."""
        self.ns(host)
        return self._links.get(host)

    def qdiscs(self, ns: str, dev: str = "eth0") -> str:
        """`tc qdisc show dev DEV` inside ns."""
        return _in(ns, "tc", "qdisc", "show", "dev", dev)

    def cut(self, host: str) -> None:
        """Partitions host: its link goes down, so it reaches no one and no one reaches it."""
        _in(self.ns(host), "ip", "link", "set", "eth0", "down")

    def heal(self, host: str) -> None:
        """Brings host's link back up (its address and route return with it)."""
        _in(self.ns(host), "ip", "link", "set", "eth0", "up")

    def cut_from(self, host: str, other: str) -> None:
        """Partitions host from `other` alone: a blackhole route in host drops everything it
        sends to other (replies included), so neither reaches the other over TCP while both
        reach everyone else (this kernel's tc has no filters to drop by peer)."""
        _in(self.ns(host), "ip", "route", "add", "blackhole", f"{self.address(other)}/32")

    def heal_from(self, host: str, other: str) -> None:
        """Undoes cut_from(host, other)."""
        _in(self.ns(host), "ip", "route", "del", "blackhole", f"{self.address(other)}/32")

    # -- processes --

    def command(self, host: str, *args: str) -> list[str]:
        """args as a command line that runs inside host (for Popen and daemon launchers)."""
        return ["ip", "netns", "exec", self.ns(host), *args]

    def run(self, host: str, *args: str, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess:
        """Runs args inside host to completion (text output captured)."""
        done = subprocess.run(self.command(host, *args), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise NetnsError(f"{' '.join(args)} on {host} exited {done.returncode}: {done.stderr[-2000:]}")
        return done

    def popen(self, host: str, *args: str, **kwargs) -> subprocess.Popen:
        """Starts args inside host; close() kills it if it still runs then."""
        return subprocess.Popen(self.command(host, *args), **kwargs)

    def wait_reachable(self, src: str, dst: str, timeout: float = 10.0) -> None:
        """Polls with one-packet pings until src reaches dst; raises NetnsError after timeout."""
        deadline = time.monotonic() + timeout
        while not self.reaches(src, dst):
            if time.monotonic() > deadline:
                raise NetnsError(f"{src} does not reach {dst} within {timeout}s")
            time.sleep(0.1)

    def reaches(self, src: str, dst: str) -> bool:
        """Whether a TCP connect from src to dst gets an answer (accepted or refused) within a
        second. (TCP rather than ping, which minimal images lack.)"""
        done = self.run(src, sys.executable, "-c", _PROBE, self.address(dst), timeout=20, check=False)
        return done.returncode == 0

    # -- teardown --

    def close(self) -> None:
        """Kills every process left in our namespaces and deletes them; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for link in self._links.values():
            link.close()
        self._links.clear()
        for ns in reversed(self._made):
            try:
                _delete_namespace(ns)
            except (NetnsError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
        self._made.clear()
        atexit.unregister(self.close)
        if errors:
            raise NetnsError("could not delete: " + "; ".join(errors))

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
