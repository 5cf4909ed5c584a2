"""The fork server of `shardps local` (client/forkserver.py): what it forks are real daemon
processes, with their own pid and session, their output on the pipe they were given, SIGTERM
handled as usual, and the exit codes `python -c "sys.exit(main())"` would give."""

import os
import re
import signal
import sys
import threading

import pytest

from shardps.client import local
from shardps.client.api import CoordinatorClient
from shardps.client.forkserver import ForkServer, ForkServerError
from shardps.proto import coordinator_pb2, exitcodes
from tests import harness

SERVER, WORKER = local.ENTRY_POINTS["server"], local.ENTRY_POINTS["worker"]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server: Linux only")


class Output:
    """Collects a forked daemon's output lines in a thread."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        return harness.poll(lambda: next((m for line in self.lines if (m := re.search(pattern, line))),
                                         None), timeout, interval=0.02, what=pattern)

    def text(self, timeout: float = 30.0) -> str:
        """Everything, once the daemon has closed its output."""
        self._thread.join(timeout)
        return "\n".join(self.lines)


@pytest.fixture
def forks(tmp_path):
    server = ForkServer([SERVER, WORKER], tmp_path / "forkserver.log",
                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    started = []

    def spawn(module, *argv):
        proc = server.spawn(module, argv)
        started.append(proc)
        return proc, Output(proc)

    yield server, spawn
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    server.close()


def test_a_forked_worker_registers_and_exits_cleanly_on_sigterm(forks):
    server, spawn = forks
    coordinator = harness.start("shardps-coordinator", "--port", "0")
    worker, out = spawn(WORKER, "--port", "0", "--device", "cpu", "--coordinator",
                        coordinator.address)
    address = out.wait_for(r"^listening on (\S+:\d+)$").group(1)
    assert worker.pid != server.proc.pid and os.getsid(worker.pid) == worker.pid
    with CoordinatorClient(coordinator.address) as client:
        node = harness.poll(lambda: next((n for n in client.nodes() if n.address == address), None),
                            30, what="the forked worker registering")
        assert node.state == coordinator_pb2.NODE_STATE_ALIVE
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == exitcodes.OK
        assert "received SIGTERM, shutting down" in out.text()
        assert next(n for n in client.nodes() if n.address == address).state == \
            coordinator_pb2.NODE_STATE_DEAD  # it said goodbye


def test_forked_daemons_exit_with_the_codes_of_their_main(forks):
    _, spawn = forks
    bad_flag, bad_out = spawn(WORKER, "--device", "cpu", "--step-delay-ms", "-1")
    assert bad_flag.wait(60) == exitcodes.USAGE
    assert "--step-delay-ms must be >= 0" in bad_out.text()

    first, first_out = spawn(SERVER, "--port", "0", "--coordinator", "")
    port = first_out.wait_for(r"^listening on \S+:(\d+)$").group(1)
    taken, taken_out = spawn(SERVER, "--port", port, "--coordinator", "")
    assert taken.wait(60) == exitcodes.BIND_FAILED
    assert "error: cannot bind" in taken_out.text()

    first.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL

    missing, missing_out = spawn("shardps.no_such_module", "--port", "0")
    assert missing.wait(60) == 1
    assert "ModuleNotFoundError" in missing_out.text()  # the traceback, as python -c prints it


def test_a_closed_fork_server_exits_and_spawns_no_more(forks):
    server, spawn = forks
    server.close()
    assert server.proc.returncode == 0
    with pytest.raises(ForkServerError, match="--no-fork-server"):
        spawn(WORKER, "--port", "0")
