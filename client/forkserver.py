"""A fork server for `shardps local`: one process imports torch, gRPC and the daemons' modules
once, then forks every server and worker daemon, each of which runs its real `main(argv)` as
a separate process (multiprocessing's forkserver, for daemons).

Why: each daemon spends ~1.2 s of CPU importing torch; four of them on two cores took ~2.5 s
before anything could train. The fork server imports once while the coordinator starts.

Fork safety: before forking, the server only imports modules (by name, so `client/` does not
import `server/` or `worker/`): it creates no gRPC channel or server, runs no torch op (torch's
OpenMP pool starts at the first parallel op) and configures no logging. The one other thread
the imports start is numpy's OpenBLAS pool, which OpenBLAS itself stops and restarts around
fork(). A forked daemon starts a new session, gets stdin from /dev/null and stdout and stderr
on the pipe its client passed, and exits with the code `python -c "sys.exit(main())"` would
give; the server reports that code to the client, which sees the daemon as a `ForkedProcess`
(a small `subprocess.Popen` look-alike).

Protocol, over a SOCK_SEQPACKET socket pair, one JSON object per message:
  client -> server  {"id": N, "module": NAME, "argv": [...]} with the stdout pipe's fd attached
  server -> client  {"id": N, "pid": PID} or {"id": N, "error": TEXT}; then {"pid": PID,
                    "exit": CODE} when it ends (CODE < 0: killed by signal -CODE)
The server exits when the client closes its end (its daemons, if any still run, carry on).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

SPAWN_TIMEOUT_S = 120.0  # for the server's imports (a cold disk) and one fork
_MAX_MESSAGE = 1 << 16


class ForkServerError(RuntimeError):
    """The fork server is gone or refused a spawn; the message says where its log is."""


class ForkServer:
    """The client's side: starts the server process at once (it imports `preload` in the
    background) and spawns daemons through it.

    `spawn` is thread-safe. `close()` lets the server exit; daemons still running are not
    stopped by it (stop them first).
    """

    def __init__(self, preload: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from shardps.client.forkserver import serve; serve()",
                 str(theirs.fileno()), *preload],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        theirs.close()
        self._sock = ours
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._exits: dict[int, int] = {}
        self._gone = False
        self._reader = threading.Thread(target=self._read, daemon=True, name="forkserver")
        self._reader.start()

    def spawn(self, module: str, argv: Sequence[str]) -> ForkedProcess:
        """Forks a daemon that runs `module.main(argv)`; its stdout and stderr come back on
        the returned process's `stdout`. Raises ForkServerError if the server cannot."""
        read_fd, write_fd = os.pipe()
        try:
            with self._lock:
                self._next_id += 1
                request_id = self._next_id
            message = json.dumps({"id": request_id, "module": module, "argv": list(argv)})
            try:
                socket.send_fds(self._sock, [message.encode()], [write_fd])
            except OSError as exc:
                raise self._error(f"cannot reach it ({exc})") from None
            with self._lock:
                if not self._changed.wait_for(lambda: request_id in self._replies or self._gone,
                                              SPAWN_TIMEOUT_S):
                    raise self._error(f"no answer within {SPAWN_TIMEOUT_S:.0f} s")
                reply = self._replies.pop(request_id, None)
            if reply is None:
                raise self._error(f"exited (code {self.proc.poll()})")
            if "error" in reply:
                raise self._error(reply["error"])
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the daemon holds its own copy
        return ForkedProcess(self, int(reply["pid"]), os.fdopen(read_fd, "r"))

    def close(self, timeout: float = 10.0) -> None:
        """Closes the connection; the server exits. Thread-safe, idempotent."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(timeout)
        self._sock.close()

    def _error(self, what: str) -> ForkServerError:
        return ForkServerError(f"the fork server {what}; see {self.log_path} "
                               "(or run with --no-fork-server)")

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(_MAX_MESSAGE)
            except OSError:
                data = b""
            with self._lock:
                if not data:
                    self._gone = True
                    self._changed.notify_all()
                    return
                message = json.loads(data)
                if "exit" in message:
                    self._exits[int(message["pid"])] = int(message["exit"])
                else:
                    self._replies[int(message["id"])] = message
                self._changed.notify_all()

    def _returncode(self, pid: int, timeout: float | None) -> int | None:
        """The daemon's exit code once the server reports it (waits up to timeout; None: not
        yet). Should the server itself die, its daemons are reparented and reaped by init;
        then one that no longer exists reads as -1 (code unknown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._changed.wait_for(lambda: pid in self._exits or self._gone, timeout)
            if pid in self._exits:
                return self._exits[pid]
            if not self._gone:
                return None
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return -1
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


class ForkedProcess:
    """A daemon forked by the fork server, used like the subprocess.Popen it replaces
    (`stdout`, `pid`, `returncode`, `poll`, `wait`, `send_signal`). Its process group is its pid."""

    def __init__(self, server: ForkServer, pid: int, stdout):
        self._server = server
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server._returncode(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server._returncode(self.pid, timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"forked daemon {self.pid}", timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass  # it has just ended; its exit code is on its way


# -- the server process ----------------------------------------------------------------------


def serve() -> None:
    """The fork server's main: `python -c "...serve()" SOCKET_FD MODULE...`."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    for name in sys.argv[2:]:
        importlib.import_module(name)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)  # SIGCHLD wakes the select below
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    selector = selectors.PollSelector()  # no descriptor of its own for the children to inherit
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    children: set[int] = set()
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                try:
                    data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1)
                except OSError:
                    data, fds = b"", []
                if not data:
                    return  # the client is done (or gone)
                request = json.loads(data)
                try:
                    pid = _fork(request, fds[0], (sock.fileno(), wake_read, wake_write))
                except OSError as exc:
                    _send(sock, {"id": request["id"], "error": f"cannot fork: {exc}"})
                else:
                    children.add(pid)
                    _send(sock, {"id": request["id"], "pid": pid})
                finally:
                    for fd in fds:
                        os.close(fd)
            else:
                while _drain(wake_read):
                    pass
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _send(sock, {"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def _send(sock: socket.socket, message: dict) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:
        pass  # the client is gone; its daemons carry on


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def _fork(request: dict, out_fd: int, inherited: Sequence[int]) -> int:
    with warnings.catch_warnings():  # Python 3.12+ warns about OpenBLAS's thread; see above
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()  # Ctrl-C in the client's terminal is for the client; it stops us in order
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(null)
        os.close(out_fd)
        code = _run(request["module"], request["argv"])
    finally:
        os._exit(code)


def _run(module: str, argv: list[str]) -> int:
    """`python -c "import sys; from MODULE import main; sys.exit(main())" ARGV...`, in this
    process, down to the exit code, the traceback on stderr and the interpreter's exit steps
    (join non-daemon threads, run atexit functions, flush)."""
    sys.argv = ["-c", *argv]
    try:
        code = _exit_code(importlib.import_module(module).main(argv))
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # as multiprocessing's children do
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
    return code


def _exit_code(value: object) -> int:
    """The exit status the interpreter gives for `sys.exit(value)`."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr, flush=True)
    return 1
