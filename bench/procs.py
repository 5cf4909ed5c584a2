"""Child processes of the benches: standalone `shardps-server`s and the baseline peers, with
their addresses read from their first lines, resident memory from /proc, and a clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence

from shardps.proto import common_pb2

LISTENING = re.compile(r"^listening on (\S+:\d+)")
METRICS = re.compile(r"^metrics on (\S+:\d+)")
SERVER_MODULE = "shardps.server.ps.daemon"


class Child:
    """A subprocess that prints `listening on HOST:PORT`; its other output is kept (last 200 lines)."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 120.0):
        self.proc = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True)
        self.address = ""
        self.metrics_address = ""
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self.address:
            self.stop()
            raise RuntimeError(f"{args[:4]} did not start:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines = (self.lines + [line])[-200:]
            if m := METRICS.match(line):
                self.metrics_address = m.group(1)
            if not self.address and (m := LISTENING.match(line)):
                self.address = m.group(1)
                self._ready.set()
        self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident set size now (VmRSS)."""
        return _status_kib(self.pid, "VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """Largest resident set size so far (VmHWM)."""
        return _status_kib(self.pid, "VmHWM") * 1024

    def metric(self, name: str) -> float:
        """Sum of every sample of a Prometheus metric line `name{...} value` (needs --metrics-port)."""
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(5)


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def start_servers(count: int, threads: int = 1, metrics: bool = False,
                  env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> list[Child]:
    """`count` standalone parameter servers (`--coordinator ''`), started in parallel."""
    args = [sys.executable, "-m", SERVER_MODULE, "--coordinator", "", "--port", "0",
            "--threads", str(threads), "--log-level", "WARNING",
            "--metrics-port", "0" if metrics else "-1", *extra]
    children: list[Child] = []
    errors: list[Exception] = []

    def one() -> None:
        try:
            children.append(Child(args, env))
        except Exception as exc:  # noqa: BLE001 - reported below, after the others started
            errors.append(exc)

    threads_ = [threading.Thread(target=one) for _ in range(count)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    if errors:
        stop_all(children)
        raise errors[0]
    return children


def stop_all(children: Sequence[Child]) -> None:
    for child in children:
        child.stop()


def shard_map(addresses: Sequence[str], total: int) -> common_pb2.ShardMap:
    """[0, total) split into one contiguous range per server, as the coordinator splits it."""
    ranges, start = [], 0
    for i, address in enumerate(addresses):
        end = total * (i + 1) // len(addresses)
        ranges.append(common_pb2.ShardRange(index=i, server_id=f"server-{i}", address=address,
                                            offset=start, length=end - start))
        start = end
    return common_pb2.ShardMap(version=1, shards=ranges)


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())
