"""Starts daemons as processes and reads what they announce: the one launcher of `shardps
local`, the tests (tests/harness.py) and the benches (bench/procs.py).

A daemon prints `metrics on HOST:PORT` if it serves metrics, then `listening on HOST:PORT`
once it is ready. A `Daemon` is one such process, either a fresh `python` that runs a module's
`main()` (as its console script would), or a fork of multiprocessing's forkserver with torch
and the daemons' modules already imported (`Forks`). Either way it runs in a session of its
own (Ctrl-C in the terminal is for its launcher, which stops it in order), reads stdin from
/dev/null and writes stdout and stderr unbuffered into one stream, which `Daemon` copies to its
log file and keeps in memory.
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing import forkserver
from pathlib import Path
from typing import IO, Protocol

from shardps.client import lifeline, scrape

# The console scripts of pyproject.toml, by name: the module whose main() each one runs.
SCRIPTS = {
    "shardps": "shardps.client.cli",
    "shardps-coordinator": "shardps.server.coordinator.daemon",
    "shardps-server": "shardps.server.ps.daemon",
    "shardps-worker": "shardps.worker.daemon",
}
LISTENING = re.compile(r"^listening on (\S+:\d+)(?: |$)")
METRICS = re.compile(r"^metrics on (\S+:\d+)$")


def module_of(program: str) -> str:
    """The module a console script runs; any other name is taken as a module with a main()."""
    return SCRIPTS.get(program, program)


def command(program: str) -> list[str]:
    """The command that runs a console script (or a module's main()) with this interpreter,
    so no script has to be on PATH; it ends when the process reading its output does
    (client/lifeline.py)."""
    return [sys.executable, "-c", "import sys; from shardps.client import lifeline; lifeline.watch(); "
            f"from {module_of(program)} import main; sys.exit(main())"]


class StartError(RuntimeError):
    """A daemon exited, or its time ran out, before it announced its address.

    `message` is the one-line reason (with the log file, if any); str() adds its last lines.
    """

    def __init__(self, message: str, output: str):
        super().__init__(f"{message}:\n{output}" if output else message)
        self.message = message


class Process(Protocol):
    """What `Daemon` needs of a process: subprocess.Popen, or a fork seen as one."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...


class Daemon:
    """One daemon process; `address` and `metrics_address` are what it announced.

    `program` is a console script's name (`SCRIPTS`) or a module with a `main()`; `args` its
    command line. With `forks` it is forked from there, otherwise started as a subprocess
    (behind `prefix`, a command such as `ip netns exec NS`, if given).
    `keep_lines` bounds the output kept in memory (None: all of it); `log_path` receives
    all of it. A reader thread owns the output; the other methods may be called from any
    thread, `wait_ready` and the stopping ones from one at a time.
    """

    def __init__(self, name: str, program: str, args: Sequence[str] = (), *,
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 keep_lines: int | None = None, forks: Forks | None = None,
                 prefix: Sequence[str] = ()):
        self.name = name
        self.log_path = log_path
        self.address = ""
        self.metrics_address = ""
        self._keep = keep_lines
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.proc: Process
        stream: IO[str]
        if forks is not None:
            self.proc, stream = forks.start(name, module_of(program), args, env)
        else:
            popen = subprocess.Popen(
                [*prefix, *command(program), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, errors="replace",
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
            assert popen.stdout is not None
            self.proc, stream = popen, popen.stdout
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True,
                                        name=f"output-{name}")
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        log = open(self.log_path, "w") if self.log_path else None  # closed below
        try:
            for raw in stream:
                if log:
                    log.write(raw)
                    log.flush()
                line = raw.rstrip("\n")
                with self._lock:
                    self._lines.append(line)
                    if self._keep is not None and len(self._lines) > self._keep:
                        del self._lines[: len(self._lines) - self._keep]
                if not self.metrics_address and (m := METRICS.match(line)):
                    self.metrics_address = m.group(1)
                if not self.address and (m := LISTENING.match(line)):
                    self.address = m.group(1)
                    self._ready.set()
        finally:
            stream.close()
            if log:
                log.close()
            self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def lines(self) -> list[str]:
        """The output so far, one string per line (the last `keep_lines` of it)."""
        with self._lock:
            return list(self._lines)

    def output(self, last: int = 200) -> str:
        return "\n".join(self.lines[-last:])

    def has_line(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self.lines)

    def matches(self, pattern: str) -> list[re.Match]:
        """Every match of pattern in the output so far, one per matching line."""
        return [m for line in self.lines if (m := re.search(pattern, line))]

    def wait_ready(self, timeout: float = 60.0) -> Daemon:
        """Waits up to timeout for its `listening on` line. If it exits or the time runs out
        first, kills it and raises StartError."""
        self._ready.wait(max(0.0, timeout))
        if not self.address:
            code = self.proc.poll()
            self.kill()
            where = f"; see {self.log_path}" if self.log_path else ""
            raise StartError(f"{self.name} did not start within {timeout:.0f} s (exit code {code}){where}",
                             self.output(30))
        return self

    def poll(self) -> int | None:
        """Its exit code (negative: the signal that ended it), or None while it runs."""
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)  # nothing if it has exited

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """Waits for it to exit and its output to end; raises subprocess.TimeoutExpired."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def reap(self, timeout: float) -> int:
        """Waits up to timeout for it to exit (after a terminate), then kills it."""
        try:
            return self.wait(max(0.1, timeout))
        except subprocess.TimeoutExpired:
            return self.kill()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within timeout; returns its exit code."""
        self.terminate()
        return self.reap(timeout)

    def kill(self) -> int:
        """SIGKILL to its process group (anything it started goes too); waits for it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # ended, or a fork not yet in its own session
                self.proc.send_signal(signal.SIGKILL)
        return self.wait(10)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples with these labels, scraped now (needs `metrics on`)."""
        return scrape.total(scrape.scrape(self.metrics_address), name, **labels)


class Forks:
    """Starts daemons as forks of multiprocessing's forkserver, which imports `preload` (torch
    and the daemons' modules) once: each fork skips the ~1 s of CPU a fresh `python` spends
    importing torch (bench/RESULTS.md, tta). Unix only.

    Creating it starts the forkserver, which imports in the background; the first `start`
    waits for that. The forkserver is this process's (multiprocessing keeps one per process:
    a second Forks shares it, with the preload of the first) and exits with it.
    """

    @staticmethod
    def available() -> bool:
        return "forkserver" in multiprocessing.get_all_start_methods()

    def __init__(self, preload: Sequence[str]):
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(preload))
        forkserver.ensure_running()

    def start(self, name: str, module: str, args: Sequence[str],
              env: dict[str, str] | None = None) -> tuple[Forked, IO[str]]:
        """Forks a daemon running `module.main(args)`; returns it and its output stream.

        Its environment is this process's with `env` over it, as a subprocess's would be (the
        forkserver's own is the one it started with); its working directory is this process's
        (multiprocessing sets it)."""
        ours, theirs = socket.socketpair()
        process = self._context.Process(target=run_forked, name=name,
                                        args=(module, list(args), {**os.environ, **(env or {})}, theirs))
        try:
            process.start()
        finally:
            theirs.close()  # the forkserver passed its own copy on to the daemon
        stream = ours.makefile("r", errors="replace")
        ours.close()  # the stream holds the socket open
        return Forked(process), stream


class Forked:
    """A forked daemon seen as the subprocess.Popen the others are (its exit code comes from
    the forkserver, which is its parent)."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self._process = process
        self.pid: int = process.pid or 0

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(f"forked {self._process.name}", timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass  # it has just ended; the forkserver is passing its exit code on


PR_SET_PDEATHSIG = 1  # prctl(2), <linux/prctl.h>
PARENT_POLL_S = 1.0   # without prctl: how often a daemon looks for its forkserver


def _end_with_forkserver(parent: int) -> None:
    """Asks for SIGTERM when the forkserver `parent` dies, so that the daemon shuts down rather
    than running on, orphaned in a session of its own (the death of the process that asked for
    the daemon is lifeline's to tell). On Linux the kernel sends it (PR_SET_PDEATHSIG), else a
    thread watches the parent's pid; a parent that died before this runs is caught by the
    getppid() check."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if libc is not None and libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_forked(module: str, argv: list[str], env: dict[str, str], out: socket.socket) -> None:
    """The forked daemon: what `python -c "import sys; from MODULE import main; sys.exit(main())"
    ARGV` does, in a session of its own, with stdout and stderr unbuffered on `out`, and `env`
    as its whole environment (PYTHONPATH's entries go first on sys.path, as at a start).

    multiprocessing has already put /dev/null on stdin; it turns sys.exit's code (or an
    exception's traceback and 1) into the exit code, joins the daemon's threads and flushes
    the streams at the end. Unlike a fresh interpreter it runs no atexit functions: the
    daemons register none of their own.
    """
    parent = os.getppid()  # the forkserver
    os.setsid()
    _end_with_forkserver(parent)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    lifeline.watch(1)  # the forkserver outlives our starter while any of its forks runs
    # As PYTHONUNBUFFERED makes them: raw writes, so lines from threads are never held back.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), errors="backslashreplace",
                                  write_through=True)
    os.environ.clear()
    os.environ.update(env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:0] = paths
    sys.argv = ["-c", *argv]
    module_main = __import__(module, fromlist=["main"]).main
    sys.exit(module_main(argv))
