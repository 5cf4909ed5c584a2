"""Starts shardps console scripts as real subprocesses and reads their addresses.

A daemon prints `listening on HOST:PORT` once ready; `Daemon.start` waits for that line
(with a deadline) and keeps the rest of its output in a log file for failure messages.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

LISTENING = re.compile(r"^listening on (\S+):(\d+)$")
METRICS = re.compile(r"^metrics on (\S+):(\d+)$")

_live: list[Daemon] = []


def script(name: str) -> list[str]:
    """The command of a console script, run with this interpreter."""
    modules = {
        "shardps": "shardps.client.cli",
        "shardps-coordinator": "shardps.server.coordinator.daemon",
        "shardps-server": "shardps.server.ps.daemon",
        "shardps-worker": "shardps.worker.daemon",
    }
    return [sys.executable, "-c", f"import sys; from {modules[name]} import main; sys.exit(main())"]


class Daemon:
    """One daemon subprocess; `address` is what it printed on its listening line."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = ()):
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self._lines: list[str] = []
        self._ready = threading.Event()
        self.address = ""
        self.metrics_address = ""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [*prefix, *script(name), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=full_env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        _live.append(self)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                self._lines.append(line)
                if m := METRICS.match(line):
                    self.metrics_address = f"{m.group(1)}:{m.group(2)}"
                if m := LISTENING.match(line):
                    self.address = f"{m.group(1)}:{m.group(2)}"
                    self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> Daemon:
        if not self._ready.wait(timeout) or not self.address:
            self.kill()
            raise RuntimeError(f"{self.name} did not start within {timeout}s:\n{self.output()}")
        return self

    def output(self) -> str:
        return "\n".join(self._lines[-200:])

    def has_line(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self._lines)

    def matches(self, pattern: str) -> list[re.Match]:
        """Every match of pattern in the output so far, one per matching line."""
        return [m for line in self._lines if (m := re.search(pattern, line))]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        """Waits for exit; raises subprocess.TimeoutExpired after timeout."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within timeout."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def start(name: str, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None,
          prefix: Sequence[str] = ()) -> Daemon:
    """Starts a daemon and waits for its listening line; `prefix` goes before the command
    (e.g. `ip netns exec NS` to run it on an emulated host)."""
    return Daemon(name, *args, env=env, prefix=prefix).wait_ready(timeout)


def kill_all() -> None:
    """Kills every daemon this process started that is still running."""
    while _live:
        _live.pop().kill()


def run_cli(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Runs `shardps ARGS` to completion and returns its CompletedProcess (text output)."""
    return subprocess.run([*script("shardps"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, input=input)


def poll(condition, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Calls condition() until it returns a truthy value; raises TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(interval)
