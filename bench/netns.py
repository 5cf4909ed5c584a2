"""Emulated hosts on one machine: network namespaces joined to a bridge by veth pairs, each
host's link shaped with `tc`, cut and healed at will. Used by bench/net.py and tests/e2e.

  with Network(["a", "b", "c"]) as net:
      net.shape("b", rate="100mbit", delay="5ms")
      net.run("a", "ping", "-c", "1", net.address("b"))

Topology: a hub namespace holds a bridge; each host is a namespace whose `eth0` is one end of
a veth pair, the other end a port of that bridge. Hosts get 10.199.0.1, .2, ... (/24), an
address range that only ever exists inside these namespaces, so it cannot clash with the
machine's own networks. The rate limits both directions of a host's link (tbf on eth0 and on
its bridge port); delay and loss (netem, which some kernels lack: `netem_available()`) apply
to what the host sends, so a round trip between two hosts sees both of their delays.

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


_netem: bool | None = None


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (delay, loss); probed once in a scratch namespace."""
    global _netem
    if _netem is None:
        with Network(["probe"]) as net:
            try:
                _in(net.ns("probe"), "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms")
                _netem = True
            except NetnsError:
                _netem = False
    return _netem


def namespaces() -> list[str]:
    """Every namespace on the machine, by name."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    stale = [ns for ns in namespaces() if (m := _OURS.match(ns)) and not _alive(int(m.group(1)))]
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
        for i, host in enumerate(self.hosts):
            ns = self.ns(host)
            self._add_namespace(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", self._port(host),
                "netns", self.hub)
            _in(self.hub, "ip", "link", "set", self._port(host), "master", "br0")
            _in(self.hub, "ip", "link", "set", self._port(host), "up")
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
              loss: str | None = None) -> None:
        """Limits host's link to rate in each direction (tbf), and delays or drops what it sends
        (netem: delay like '5ms', loss like '1%'). Replaces earlier shaping of that host."""
        ns = self.ns(host)
        bits = parse_rate(rate) if rate else 0  # bad input is refused before anything changes
        if (delay or loss) and not netem_available():
            raise NetnsError("this kernel has no netem qdisc (sch_netem): delay and loss cannot be emulated")
        self.unshape(host)
        parent = ["root"]
        if delay or loss:
            args = ["delay", delay] if delay else []
            args += ["loss", loss] if loss else []
            _in(ns, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "netem", *args)
            parent = ["parent", "1:"]
        if bits:
            tbf = ["tbf", "rate", f"{bits}bit", "burst", str(_burst_bytes(bits)), "latency", "100ms"]
            _in(ns, "tc", "qdisc", "add", "dev", "eth0", *parent, "handle", "2:", *tbf)
            _in(self.hub, "tc", "qdisc", "add", "dev", self._port(host), "root", *tbf)

    def unshape(self, host: str) -> None:
        """Removes host's shaping (both directions); a no-op when it has none."""
        for ns, dev in ((self.ns(host), "eth0"), (self.hub, self._port(host))):
            shown = self.qdiscs(ns, dev)
            if "qdisc tbf" in shown or "qdisc netem" in shown:
                _in(ns, "tc", "qdisc", "del", "dev", dev, "root")

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
