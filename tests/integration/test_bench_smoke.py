"""Every bench runs end to end in its small configuration, so the suite cannot rot.

No timing is asserted: only that each script finishes, prints its table and writes its JSON
with the columns bench/RESULTS.md quotes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = {
    "wire": ["shardps_GBps", "raw_GBps", "grpc_GBps", "vs_raw", "vs_grpc"],
    "apply": ["torch_ms", "server_apply_ms", "ratio"],
    "step": ["pull", "compute", "push", "apply", "shardps_step", "local_step", "ratio"],
    "tta": ["system", "tta_s", "startup_s", "train_s", "vs_ddp"],
    "scale": ["params", "loss_decreasing", "servers_within"],
    "data": ["files_step", "memory_step", "ratio", "max_ahead"],
    "sparse_huge": ["params", "init_s", "step_s", "worker_peak_MB", "servers_within"],
    "sparse": ["rows", "pull", "compute", "push", "step", "ratio"],
    "replicas": ["R", "push_ms", "vs_R1", "rss_MiB_server_A", "rss_MiB_server_B"],
    "reshard": ["to_servers", "before", "during", "ratio", "move_s"],
}


@pytest.mark.parametrize("name", list(BENCHES))
def test_bench_runs_in_its_small_configuration(name, tmp_path):
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--small", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    first_table = next(iter(result["tables"].values()))
    assert first_table, result
    for column in BENCHES[name]:
        assert column in first_table[0], (column, first_table[0])
    assert result["machine"]["cpus"] >= 1 and result["command"].endswith("--small --out-dir " + str(tmp_path))
    assert "wrote" in done.stdout
