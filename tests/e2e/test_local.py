"""`shardps local`: the README's main job, as a user runs it."""

import json
import re

import pytest
import torch

from shardps.proto import spec
from tests import harness


def test_local_trains_digits_to_target_with_two_servers_and_two_workers(tmp_path):
    model_path = tmp_path / "model.pt"
    done = harness.run_cli("local", "--servers", "2", "--workers", "2", "--interval", "0.1",
                           "--export", str(model_path), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "starting a coordinator, 2 server(s) and 2 worker(s)" in out
    progress = [line for line in out.splitlines() if " RUNNING " in line]
    assert len(progress) >= 2, out  # live progress, not just a verdict
    verdict = re.search(r"(CONVERGED|COMPLETED) after (\d+) steps .*accuracy (\d\.\d+)", out)
    assert verdict, out
    assert float(verdict.group(3)) >= 0.96
    state = torch.load(model_path, weights_only=True)
    assert set(state) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias",
                          "net.4.weight", "net.4.bias"} or len(state) == 6


def test_local_refuses_a_bad_spec_before_starting_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: mlp}\ndata: {dataset: digits}\nstop: {max_steps: 5}\noptimizer: {lr: -1}\n")
    done = harness.run_cli("local", str(bad), timeout=60)
    assert done.returncode == 2
    assert "optimizer.lr" in done.stderr
    assert "starting" not in done.stdout


def test_local_fails_a_diverging_job_and_says_why(tmp_path):
    diverging = tmp_path / "diverge.yaml"
    diverging.write_text(
        "model: {name: mlp}\ndata: {dataset: regression, kwargs: {}}\n"
        "optimizer: {lr: 1.0e+6}\nstop: {max_steps: 300, eval_every: 50}\n"
        "cluster: {servers: 1, workers: 1}\n")
    spec.parse_spec(diverging.read_text())
    done = harness.run_cli("local", str(diverging), timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "non-finite" in done.stdout


@pytest.mark.parametrize("flag", ["--fork-server", "--no-fork-server"])
def test_local_starts_daemons_with_or_without_the_fork_server(tmp_path, flag):
    small = tmp_path / "small.yaml"
    small.write_text("model: {name: mlp, kwargs: {hidden: [8]}}\ndata: {dataset: regression}\n"
                     "stop: {max_steps: 20, eval_every: 10}\ncluster: {servers: 1, workers: 1}\n")
    log_dir = tmp_path / "logs"
    done = harness.run_cli("local", str(small), "--log-dir", str(log_dir), "--output", "json", flag,
                           timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["state"] == "JOB_STATE_COMPLETED"
    for name in ("coordinator", "server-0", "worker-0"):
        log = (log_dir / f"{name}.log").read_text()
        assert re.search(r"^listening on 127\.0\.0\.1:\d+$", log, re.M), log
        assert "received SIGTERM, shutting down" in log, log
