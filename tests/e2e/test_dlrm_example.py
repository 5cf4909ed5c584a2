"""The README's click-log commands as a user runs them: `shardps data ctr` writes a log, then
`shardps local examples/dlrm.yaml` trains on it (here shortened: a small log, few steps)."""

import re
import subprocess
from pathlib import Path

import yaml

from shardps.proto import spec
from tests import harness

ROOT = Path(__file__).resolve().parents[2]


def shardps(cwd, *args, timeout):
    return subprocess.run([*harness.script("shardps"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def train_shortened(tmp_path, example: str, **tables) -> None:
    """Writes a small click log as the README does, then runs `example` on it shortened (60
    steps, batch 64, constant lr; `tables` overrides keys of its `tables:` section): it
    completes, learns, and stays under the generator's Bayes bound."""
    made = shardps(tmp_path, "data", "ctr", "data/ctr", "--rows", "6000", "--files", "5", "--seed", "7",
                   timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    bound = float(re.search(r"Bayes AUC (\d\.\d+)", made.stdout).group(1))
    raw = yaml.safe_load((ROOT / "examples" / example).read_text())
    assert raw["data"]["files"]["path"] == "data/ctr"  # relative: the directory we run in
    raw["stop"] = {"max_steps": 60, "eval_every": 30}
    raw["optimizer"]["schedule"] = {"name": "constant"}
    raw["data"]["batch_size"] = 64
    raw.setdefault("tables", {}).update(tables)
    spec.parse_spec(yaml.safe_dump(raw))
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(raw))
    done = shardps(tmp_path, "local", "small.yaml", "--interval", "0.2", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    verdict = re.search(r"COMPLETED after 60 steps .*: auc (\d\.\d+)", done.stdout)
    assert verdict, done.stdout
    auc = float(verdict.group(1))
    assert 0.55 < auc < bound, (auc, bound)  # it learns, and the generator's bound holds


def test_generate_a_click_log_and_train_the_dlrm_example_on_it(tmp_path):
    train_shortened(tmp_path, "dlrm.yaml")


def test_the_dlrm_example_with_its_tables_on_the_servers(tmp_path):
    """examples/dlrm_tables.yaml as the README runs it, shortened: a small log, few steps; the
    dynamic table's rows live on the servers and the job still learns."""
    raw = yaml.safe_load((ROOT / "examples" / "dlrm_tables.yaml").read_text())
    assert raw["model"]["kwargs"]["tables"] == "dynamic"
    train_shortened(tmp_path, "dlrm_tables.yaml", max_rows=2000)  # per server: this log overflows it
