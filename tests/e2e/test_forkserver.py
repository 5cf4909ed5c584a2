"""Daemons forked by multiprocessing's forkserver, as `shardps local` starts its servers and
workers (client/launcher.py, `Forks`): real daemon processes, with their own pid and session,
their output on their own stream, SIGTERM handled as usual, the exit codes
`python -c "sys.exit(main())"` would give, a SIGKILL of one leaves the others running, and a
SIGKILL of the forkserver, or of the process that started them, ends them all (a daemon
started as a fresh `python` too)."""

import os
import signal
import subprocess
import sys

import pytest

from shardps.client import launcher
from shardps.client.api import CoordinatorClient
from shardps.proto import coordinator_pb2, exitcodes
from tests import harness

SERVER, WORKER = launcher.SCRIPTS["shardps-server"], launcher.SCRIPTS["shardps-worker"]
# The tests' own daemons (a coordinator) start as console scripts, outside the forkserver
# these tests fork from and kill.
pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="forkserver: Unix only"),
              pytest.mark.console_scripts]


@pytest.fixture
def fork(tmp_path):
    forks = launcher.Forks([SERVER, WORKER])  # this process's forkserver, started once
    started: list[launcher.Daemon] = []

    def start(script: str, *args: str) -> launcher.Daemon:
        daemon = launcher.Daemon(script, script, args, forks=forks,
                                 log_path=tmp_path / f"{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_forked_worker_registers_and_exits_cleanly_on_sigterm(fork):
    coordinator = harness.start("shardps-coordinator", "--port", "0")
    worker = fork("shardps-worker", "--port", "0", "--device", "cpu", "--coordinator",
                  coordinator.address).wait_ready()
    assert os.getsid(worker.pid) == worker.pid  # a session of its own
    assert parent_of(worker.pid) != os.getpid()  # forked by the forkserver, not by us
    with CoordinatorClient(coordinator.address) as client:
        node = harness.poll(lambda: next((n for n in client.nodes() if n.address == worker.address),
                                         None), 30, what="the forked worker registering")
        assert node.state == coordinator_pb2.NODE_STATE_ALIVE
        worker.terminate()
        assert worker.wait(30) == exitcodes.OK
        assert worker.has_line("received SIGTERM, shutting down"), worker.output()
        assert next(n for n in client.nodes() if n.address == worker.address).state == \
            coordinator_pb2.NODE_STATE_DEAD  # it said goodbye
    assert worker.log_path.read_text().splitlines()[-1] == worker.lines[-1]  # all of it logged


def test_forked_daemons_exit_with_the_codes_of_their_main(fork):
    bad_flag = fork("shardps-worker", "--device", "cpu", "--step-delay-ms", "-1")
    assert bad_flag.wait(60) == exitcodes.USAGE
    assert bad_flag.has_line("--step-delay-ms must be >= 0"), bad_flag.output()

    first = fork("shardps-server", "--port", "0", "--coordinator", "").wait_ready()
    port = first.address.rsplit(":", 1)[1]
    taken = fork("shardps-server", "--port", port, "--coordinator", "")
    assert taken.wait(60) == exitcodes.BIND_FAILED
    assert taken.has_line("error: cannot bind"), taken.output()

    missing = fork("shardps.no_such_module", "--port", "0")
    assert missing.wait(60) == 1
    assert missing.has_line("ModuleNotFoundError"), missing.output()  # the traceback, as python -c


def test_a_sigkilled_fork_leaves_the_others_and_the_forkserver_running(fork):
    first, second = (fork("shardps-server", "--port", "0", "--coordinator", "").wait_ready()
                     for _ in range(2))
    first.signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    assert second.poll() is None
    third = fork("shardps-server", "--port", "0", "--coordinator", "").wait_ready()
    for daemon in (second, third):
        daemon.terminate()
        assert daemon.wait(30) == exitcodes.OK, daemon.output()


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, not yet reaped by whoever inherited it, does not). A
    process reaped between the open and the read of its stat file reads as ESRCH."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_forked_daemons_end_when_the_forkserver_is_sigkilled(fork):
    """Found closing issue 10: a forked daemon runs in a session of its own, so when the
    forkserver was SIGKILLed (or `shardps local`, whose forkserver then exits) its daemons ran
    on for ever, orphaned. Now the kernel sends each SIGTERM when the forkserver dies
    (PR_SET_PDEATHSIG), and it shuts down as on any SIGTERM."""
    daemons = [fork("shardps-server", "--port", "0", "--coordinator", "").wait_ready()
               for _ in range(2)]
    pids = [daemon.pid for daemon in daemons]
    forkserver_pid = parent_of(pids[0])
    assert parent_of(pids[1]) == forkserver_pid != os.getpid()
    try:
        os.kill(forkserver_pid, signal.SIGKILL)
        for daemon in daemons:
            harness.poll(lambda pid=daemon.pid: not alive(pid), 30, what="the forked daemon ending")
            assert daemon.has_line("received SIGTERM, shutting down"), daemon.output()
    finally:
        for pid in pids:  # the forkserver is gone: no exit code, and the fixture's kill skips them
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["forked", "python"])
def test_daemons_end_when_the_process_that_started_them_is_sigkilled(tmp_path, how):
    """Found closing issue 10: a SIGKILLed `shardps local` left its servers and workers
    running for ever, forked or started as a fresh `python` (its coordinator always is), and
    the forkserver too (it lives while any of its forks does). Now each daemon watches the far
    end of its output stream, which only the process that started it holds
    (client/lifeline.py), and gets SIGTERM when that closes."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER, how], stdout=subprocess.PIPE, text=True,
                               cwd=tmp_path, start_new_session=True)
    pids = []
    try:
        assert starter.stdout is not None
        pids = [int(starter.stdout.readline()) for _ in range(2)]
        assert all(alive(pid) for pid in pids)
        starter.kill()
        starter.wait(30)
        for pid in pids:
            harness.poll(lambda pid=pid: not alive(pid), 30, what="the forked daemon ending")
    finally:
        starter.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# Starts two standalone servers as `shardps local` does (argv[1]: "forked" or "python"),
# prints their pids, then waits.
STARTER = f"""
import sys, time
from shardps.client import launcher
forks = launcher.Forks([{SERVER!r}]) if sys.argv[1] == "forked" else None
daemons = [launcher.Daemon("s", {SERVER!r}, ["--port", "0", "--coordinator", ""], forks=forks).wait_ready()
           for _ in range(2)]
for daemon in daemons:
    print(daemon.pid, flush=True)
time.sleep(600)
"""
