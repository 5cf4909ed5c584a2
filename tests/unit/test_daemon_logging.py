"""Structured logs: every line names the role, node and job it is about."""

import json
import logging
import threading

import pytest

from shardps.proto import daemon


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
