"""Starts shardps console scripts as real subprocesses (client/launcher.py) and reads their
addresses; runs the CLI; polls with a deadline.

A daemon prints `listening on HOST:PORT` once ready; `Daemon.wait_ready` waits for that line
(with a deadline) and keeps the rest of its output in a log file for failure messages.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from shardps.client import launcher

_live: list[Daemon] = []


def script(name: str) -> list[str]:
    """The command of a console script, run with this interpreter."""
    return launcher.command(name)


class Daemon(launcher.Daemon):
    """A console script (`shardps-server`, ...) started as a subprocess with these arguments,
    killed by `kill_all` at the end of the test if it still runs."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = ()):
        log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        super().__init__(name, name, args, env=env, log_path=log_path, prefix=prefix)
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
