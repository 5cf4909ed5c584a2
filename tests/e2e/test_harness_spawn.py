"""How tests/harness.py starts daemons: forked from one forkserver per test process that has
imported torch and the daemons' modules but started nothing (one thread: no gRPC core, no torch
thread pool for a fork to inherit), or, with SHARDPS_TEST_SPAWN=exec, as console scripts that
are children of the test process itself."""

import os
import signal

import pytest

from shardps.proto import exitcodes
from tests import harness

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forkserver: Unix only")


def status_field(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith(key + ":"))


def parent_of(pid: int) -> int:
    return int(status_field(pid, "PPid"))


def test_daemons_fork_from_one_forkserver_that_runs_one_thread(monkeypatch, tmp_path):
    monkeypatch.delenv(harness.SPAWN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    first = harness.start("shardps-server", "--port", "0", "--coordinator", "",
                          "--data-dir", "relative")
    coord = harness.start("shardps-coordinator", "--port", "0")
    forkserver = parent_of(first.pid)
    assert forkserver != os.getpid() and parent_of(coord.pid) == forkserver
    assert os.getsid(first.pid) == first.pid  # a session of its own
    assert status_field(forkserver, "Threads") == "1"
    assert (tmp_path / "relative").is_dir()  # the test's working directory, not the forkserver's
    first.signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    again = harness.start("shardps-server", "--port", "0", "--coordinator", "",
                          "--data-dir", "relative")
    assert parent_of(again.pid) == forkserver and again.stop() == exitcodes.OK, again.output()


def test_spawn_exec_starts_console_scripts_as_children_of_the_test(monkeypatch):
    monkeypatch.setenv(harness.SPAWN_ENV, "exec")
    server = harness.start("shardps-server", "--port", "0", "--coordinator", "")
    assert parent_of(server.pid) == os.getpid()
    assert server.stop() == exitcodes.OK, server.output()


def test_an_unknown_spawn_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(harness.SPAWN_ENV, "vfork")
    with pytest.raises(ValueError, match="SHARDPS_TEST_SPAWN must be one of fork, exec, got 'vfork'"):
        harness.start("shardps-server", "--port", "0", "--coordinator", "")
