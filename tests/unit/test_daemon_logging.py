"""Structured logs: every line names the role, node and job it is about."""

import io
import json
import logging
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry

from shardps.runtime import daemon, rpc


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    daemon.set_log_node("")


def test_json_lines_carry_role_node_and_the_threads_job(capsys):
    daemon.setup_logging("INFO", "json", role="worker")
    daemon.set_log_node("worker-abc123")
    log = logging.getLogger("shardps.test")
    with daemon.job_log_context("digits-0001"):
        log.info("step %d done", 7)
        other = threading.Thread(target=lambda: log.info("from another thread"))
        other.start()
        other.join()
    log.warning("idle")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(entry["msg"], entry["job"]) for entry in lines] == [
        ("step 7 done", "digits-0001"), ("from another thread", ""), ("idle", "")]
    assert all(entry["role"] == "worker" and entry["node"] == "worker-abc123" for entry in lines)
    assert lines[2]["level"] == "WARNING" and lines[0]["logger"] == "shardps.test"


def test_text_lines_show_node_and_job(capsys):
    daemon.setup_logging("INFO", "text", role="server")
    daemon.set_log_node("server-1")
    with daemon.job_log_context("job-9"):
        logging.getLogger("shardps.ps").info("shard created")
    line = capsys.readouterr().err.strip()
    assert line.endswith("INFO server-1 [job-9] shardps.ps: shard created")


class _Writes(io.RawIOBase):
    """A raw stream that records each write it gets."""

    def __init__(self):
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.writes.append(bytes(data))
        return len(data)


def test_the_readiness_line_is_one_write_even_on_unbuffered_stdout(monkeypatch):
    # As under PYTHONUNBUFFERED=1 (shardps local, the tests): every text write goes straight
    # through, so a line written in two pieces lets another thread's log line in between.
    raw = _Writes()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))
    rpc.announce("127.0.0.1", 4242)
    assert raw.writes == [b"listening on 127.0.0.1:4242\n"]


def test_the_metrics_line_is_one_write_too(monkeypatch):
    # Launchers read `metrics on HOST:PORT` the same way (tests scrape workers by it; one run
    # found a worker's metrics address empty, most likely a log line landing inside it).
    raw = _Writes()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))
    endpoint = daemon.start_metrics(CollectorRegistry(), "127.0.0.1", 0)
    assert endpoint is not None
    try:
        assert raw.writes == [f"metrics on {endpoint.address}\n".encode()]
    finally:
        endpoint.shutdown()
