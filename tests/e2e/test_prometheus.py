"""A real Prometheus scrapes a training cluster with deploy/prometheus.yml; the dashboard's
queries name only metrics the daemons really export."""

import json
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import harness

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "shardps-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
# CI installs Prometheus and sets this, so a missing binary fails there instead of skipping.
REQUIRED = os.environ.get("SHARDPS_REQUIRE_PROMETHEUS") == "1"

JOB_SPEC = """
name: scraped
model: {name: mlp}
data: {dataset: digits, batch_size: 64}
consistency: {mode: async}
cluster: {servers: 2, workers: 2}
stop: {max_steps: 100000, eval_every: 50}
"""


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on, read from /proc (so Prometheus can bind port 0)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if m := re.match(r"socket:\[(\d+)\]", target):
            inodes.add(m.group(1))
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def dashboard_metrics() -> set[str]:
    """Metric names used by the dashboard's queries (histogram/counter suffixes kept)."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {name for e in exprs for name in re.findall(r"\b((?:shardps|process)_[a-z_]+)\b", e)}


def test_dashboard_is_valid_grafana_json_with_the_panels_issue_6_asks_for():
    dash = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("throughput", "loss", "staleness", "straggler", "shard"):
        assert word in titles
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


@pytest.fixture
def prometheus_bin():
    if not PROMETHEUS:
        if REQUIRED:
            pytest.fail("prometheus is not installed but SHARDPS_REQUIRE_PROMETHEUS=1")
        pytest.skip("prometheus is not installed (Debian package 'prometheus'; .ci/run installs it)")
    return PROMETHEUS


def test_prometheus_scrapes_every_daemon_of_a_training_cluster(prometheus_bin, tmp_path):
    coord = harness.start("shardps-coordinator", "--port", "0", "--metrics-port", "0", "--lease-ms", "2000")
    nodes = [harness.start(kind, "--port", "0", "--metrics-port", "0", "--coordinator", coord.address)
             for kind in ("shardps-server", "shardps-server", "shardps-worker", "shardps-worker")]
    assert coord.metrics_address and all(n.metrics_address for n in nodes)

    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    text = yaml.safe_dump(config).replace("127.0.0.1:9100", coord.metrics_address)
    text = text.replace("refresh_interval: 5s", "refresh_interval: 1s")
    (tmp_path / "prometheus.yml").write_text(text)
    prom = subprocess.Popen(
        [prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", "--web.listen-address=127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        port = harness.poll(lambda: next(iter(listening_ports(prom.pid)), None), timeout=30,
                            what="prometheus listening")
        api = f"http://127.0.0.1:{port}/api/v1/"

        def query(expr: str) -> list[dict]:
            url = api + "query?" + urllib.parse.urlencode({"query": expr})
            with urllib.request.urlopen(url, timeout=5) as reply:
                return json.load(reply)["data"]["result"]

        done = harness.run_cli("submit", "-", "--coordinator", coord.address, input=JOB_SPEC)
        assert done.returncode == 0, done.stderr
        job = done.stdout.strip()

        def all_up():
            up = query("up")
            return len(up) == 5 and all(r["value"][1] == "1" for r in up)

        harness.poll(all_up, timeout=60, interval=0.5, what="all 5 daemons up in Prometheus")
        for expr in (f'sum(shardps_ps_pushes_total{{job="{job}"}})',
                     f'sum(shardps_ps_pulls_total{{job="{job}"}})',
                     f'sum(shardps_worker_steps_total{{job="{job}"}})',
                     f'shardps_coordinator_job_step{{job="{job}"}}'):
            harness.poll(lambda e=expr: (r := query(e)) and float(r[0]["value"][1]) > 0,
                         timeout=60, interval=0.5, what=expr)
        for expr in (f'shardps_worker_loss{{job="{job}"}}', f'shardps_coordinator_job_loss{{job="{job}"}}',
                     f'shardps_coordinator_job_best_metric{{job="{job}"}}'):
            harness.poll(lambda e=expr: (r := query(e)) and float(r[0]["value"][1]) > 0,
                         timeout=60, interval=0.5, what=expr)
        roles = {r["metric"].get("role") for r in query("up")}
        assert roles == {"coordinator", "server", "worker"}

        with urllib.request.urlopen(api + "label/__name__/values", timeout=5) as reply:
            scraped = set(json.load(reply)["data"])
        missing = sorted(name for name in dashboard_metrics() if name not in scraped)
        assert not missing, f"dashboard queries metrics no daemon exports: {missing}"
        catalogue = (ROOT / "docs" / "metrics.md").read_text()
        undocumented = sorted(name for name in scraped if name.startswith("shardps_")
                              and re.sub(r"_(bucket|sum|count)$", "", name) not in catalogue)
        assert not undocumented, f"docs/metrics.md does not list {undocumented}"
        harness.run_cli("cancel", job, "--coordinator", coord.address)
    finally:
        prom.terminate()
        prom.wait(30)
