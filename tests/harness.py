"""Starts shardps daemons as real processes and reads their addresses; runs the CLI; polls with
a deadline.

A daemon prints `listening on HOST:PORT` once ready; `Daemon.wait_ready` waits for that line
(with a deadline) and keeps the rest of its output in a log file for failure messages.

How a daemon starts (client/launcher.py), `spawn()`:
- "fork" (the default): forked from this test process's forkserver, which imported torch, grpc
  and the three daemons' modules once (`Forks`). A fresh `python` spends ~4 CPU-seconds on those
  imports, and the suite starts hundreds of daemons on 2 cores. A fork is a daemon all the same:
  its own pid and session, signals, exit codes, output stream, this process's environment and
  working directory at its start (tests/e2e/test_forkserver.py). The forkserver only imports:
  it never creates a gRPC channel or server or a torch thread pool, so no daemon inherits one.
- "exec": the console script run by a fresh `python`, as a user starts it. Tests about the
  console scripts themselves mark themselves `@pytest.mark.console_scripts` (tests/conftest.py:
  test_cluster.py, test_forkserver.py); `SHARDPS_TEST_SPAWN=exec` starts every daemon so; a
  daemon behind a `prefix` (a network namespace) always starts so.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from shardps.client import launcher

SPAWN_ENV = "SHARDPS_TEST_SPAWN"
SPAWNS = ("fork", "exec")
# What the forkserver imports before its first fork: every daemon's module (and so torch, grpc).
PRELOAD = [launcher.SCRIPTS[name] for name in ("shardps-coordinator", "shardps-server", "shardps-worker")]
_console_scripts = False  # the running test starts its daemons as console scripts (its marker)

_live: list[Daemon] = []


def spawn_setting() -> str:
    """SHARDPS_TEST_SPAWN: "fork" (the default) or "exec"; anything else is a ValueError."""
    value = os.environ.get(SPAWN_ENV, "fork")
    if value not in SPAWNS:
        raise ValueError(f"{SPAWN_ENV} must be one of {', '.join(SPAWNS)}, got {value!r}")
    return value


def use_console_scripts(on: bool) -> None:
    """Whether the running test starts its daemons as console scripts (tests/conftest.py)."""
    global _console_scripts
    _console_scripts = on


def spawn() -> str:
    """How a daemon starts now: "fork" or "exec" (see the module docstring)."""
    if _console_scripts or not launcher.Forks.available():
        return "exec"
    return spawn_setting()


def script(name: str) -> list[str]:
    """The command of a console script, run with this interpreter."""
    return launcher.command(name)


class Daemon(launcher.Daemon):
    """A console script (`shardps-server`, ...) started with these arguments, forked or as a
    subprocess (`spawn()`), killed by `kill_all` at the end of the test if it still runs."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = ()):
        log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        # Forks() (re)sets the preload each time: test_forkserver.py sets its own, and SIGKILLs
        # the forkserver; the next fork then starts a new one, which must preload all three.
        forks = launcher.Forks(PRELOAD) if not prefix and spawn() == "fork" else None
        super().__init__(name, name, args, env=env, log_path=log_path, prefix=prefix, forks=forks)
        _live.append(self)


def start(name: str, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None,
          prefix: Sequence[str] = ()) -> Daemon:
    """Starts a daemon and waits for its listening line; `prefix` goes before the command
    (e.g. `ip netns exec NS` to run it on a namespace host)."""
    daemon = Daemon(name, *args, env=env, prefix=prefix)
    daemon.wait_ready(timeout)
    return daemon


def kill_all() -> None:
    """Kills every daemon this process started that is still running."""
    while _live:
        _live.pop().kill()


# At exit too (before multiprocessing's own exit function, registered earlier, which would wait
# for ever for a fork still running).
atexit.register(kill_all)


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
