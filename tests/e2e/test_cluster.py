"""The real console scripts as separate processes: a hand-started cluster driven by the CLI."""

import json
import signal
import time
from pathlib import Path

import pytest

from shardps.proto import spec as specs
from tests import harness

# As a user starts them: every daemon here is a console script run by a fresh python.
pytestmark = pytest.mark.console_scripts
ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.yaml"


@pytest.fixture(scope="module")
def cluster():
    """A coordinator, 2 servers and 2 workers, each its own process, as a user starts them."""
    coord = harness.start("shardps-coordinator", "--port", "0", "--lease-ms", "2000",
                          "--metrics-port", "0")
    servers = [harness.start("shardps-server", "--port", "0", "--coordinator", coord.address)
               for _ in range(2)]
    workers = [harness.start("shardps-worker", "--port", "0", "--coordinator", coord.address,
                             "--threads", "1") for _ in range(2)]
    daemons = [coord, *servers, *workers]
    yield coord
    for d in reversed(daemons):
        assert d.stop() == 0, f"{d.name} did not exit cleanly:\n{d.output()}"
    harness.kill_all()


@pytest.fixture(autouse=True)
def _kill_leftover_daemons():
    """Overrides the per-test cleanup: the module's cluster outlives each test."""
    yield


def cli(coord, *args, timeout=120.0):
    return harness.run_cli(*args, "--coordinator", coord.address, timeout=timeout)


def nodes(coord):
    out = cli(coord, "nodes", "--output", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_nodes_lists_every_daemon_alive(cluster):
    alive = harness.poll(lambda: [n for n in nodes(cluster) if n["state"] == "NODE_STATE_ALIVE"]
                         if len(nodes(cluster)) >= 4 else None, timeout=30, what="4 nodes")
    roles = sorted(n["role"] for n in alive)
    assert roles == ["ROLE_SERVER", "ROLE_SERVER", "ROLE_WORKER", "ROLE_WORKER"]
    table = cli(cluster, "nodes")
    assert table.returncode == 0 and table.stdout.count("alive") == 4


@pytest.mark.parametrize("patch, field", [
    ("bogus_key: 1\n", "bogus_key"),
    ("optimizer: {lr: -0.5}\n", "optimizer.lr"),
])
def test_bad_spec_is_refused_naming_the_field(cluster, tmp_path, patch, field):
    bad = tmp_path / "bad.yaml"
    optimizer = "optimizer: {lr: 0.001, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 0.0}\n"
    text = DIGITS.read_text().replace(optimizer, "")
    bad.write_text(text + patch)
    out = cli(cluster, "submit", str(bad))
    assert out.returncode == 2
    assert field in out.stderr
    assert cli(cluster, "status").returncode == 0  # the coordinator is still there


def test_unknown_model_is_refused_by_the_coordinator_itself(cluster):
    from shardps.client.api import ClientError, CoordinatorClient

    with CoordinatorClient(cluster.address) as client:
        before = len(client.jobs())
        with pytest.raises(ClientError) as info:
            client.submit(DIGITS.read_text().replace("name: mlp", "name: resnet9000"))
        assert "model.name" in str(info.value)
        assert len(client.jobs()) == before


def test_submit_watch_status_export(cluster, tmp_path):
    submitted = cli(cluster, "submit", str(DIGITS), "--output", "json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]

    watched = cli(cluster, "watch", job_id, "--interval", "0.5", timeout=600)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "step" in watched.stdout and "loss" in watched.stdout

    status = cli(cluster, "status", job_id, "--output", "json")
    info = json.loads(status.stdout)
    assert info["state"] in ("JOB_STATE_CONVERGED", "JOB_STATE_COMPLETED")
    assert info["metric"] == "accuracy" and info["metric_value"] >= 0.96
    assert info["losses"] and info["evals"]
    text = cli(cluster, "status", job_id)
    assert "accuracy" in text.stdout and job_id in text.stdout

    out = tmp_path / "model.pt"
    exported = cli(cluster, "export", job_id, "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    accuracy = accuracy_of_exported(out, info["spec_yaml"])
    assert accuracy == pytest.approx(info["metric_value"], abs=1e-9)

    png = tmp_path / "curve.png"
    plotted = cli(cluster, "plot", job_id, "-o", str(png))
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_watch_on_a_terminal_draws_the_live_view(cluster, tmp_path):
    short = tmp_path / "short.yaml"
    short.write_text(DIGITS.read_text().replace(
        "stop: {max_steps: 3000, target: {metric: accuracy, value: 0.97}, patience: 10, eval_every: 100}",
        "stop: {max_steps: 400, eval_every: 100}"))
    job_id = cli(cluster, "submit", str(short)).stdout.strip()
    screen = run_in_terminal([*harness.script("shardps"), "watch", job_id, "--interval", "0.3",
                              "--coordinator", cluster.address], timeout=300)
    assert "█" in screen and "400/400 steps" in screen
    assert "workers" in screen and "servers" in screen and "pushes/s" in screen
    assert "accuracy" in screen and "COMPLETED" in screen


def run_in_terminal(command, timeout):
    """Runs a command with a pseudo-terminal as stdout and returns everything it drew."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))  # rows, columns
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # use the pty's size
    proc = subprocess.Popen(command, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(30) == 0
    return b"".join(chunks).decode(errors="replace")


def accuracy_of_exported(path, spec_yaml):
    """Loads model.pt in a plain process, as a user would, into the built-in model."""
    code = f"""
import sys, torch, yaml
from shardps.proto import spec
from shardps.worker import datasets, models, evaluate
s = spec.parse_spec(sys.stdin.read())
data = datasets.load_dataset(s["data"]["dataset"], s["data"]["kwargs"], s["seed"])
model = models.build_model(s["model"]["name"], s["model"]["kwargs"], data.info)
model.load_state_dict(torch.load({str(path)!r}, weights_only=True))
print(evaluate.evaluate(model, data, torch.device("cpu"))["accuracy"])
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], input=spec_yaml, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip())


def test_cancel_ends_a_running_job_and_frees_the_workers(cluster, tmp_path):
    long_job = tmp_path / "long.yaml"
    long_job.write_text(DIGITS.read_text().replace(
        "stop: {max_steps: 3000, target: {metric: accuracy, value: 0.97}, patience: 10, eval_every: 100}",
        "stop: {max_steps: 1000000, eval_every: 1000}"))
    job_id = cli(cluster, "submit", str(long_job)).stdout.strip()
    harness.poll(lambda: int(json.loads(cli(cluster, "status", job_id, "--output", "json").stdout)
                 .get("step", 0)) > 5, timeout=120, what="the job running")
    cancelled = cli(cluster, "cancel", job_id)
    assert cancelled.returncode == 0 and "CANCELLED" in cancelled.stdout
    harness.poll(lambda: all(not n.get("job_id") for n in nodes(cluster)
                             if n["role"] == "ROLE_WORKER"), timeout=30, what="workers idle")
    info = json.loads(cli(cluster, "status", job_id, "--output", "json").stdout)
    assert info["state"] == "JOB_STATE_CANCELLED"
    step = info["step"]
    time.sleep(1.0)  # an interval in which a job that was not stopped would advance
    assert json.loads(cli(cluster, "status", job_id, "--output", "json").stdout)["step"] == step


def test_daemons_shut_down_cleanly_on_sigterm():
    coord = harness.start("shardps-coordinator", "--port", "0")
    server = harness.start("shardps-server", "--port", "0", "--coordinator", coord.address)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    coord.signal(signal.SIGINT)
    assert coord.wait(30) == 0


def test_the_spec_local_runs_by_default_is_valid():
    assert specs.parse_spec(DIGITS.read_text())["cluster"] == {"servers": 2, "workers": 2,
                                                              "replicas": 1, "shards": 2}
