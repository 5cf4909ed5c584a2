"""`.ci/typecheck.py` checks the parts as the one package `shardps`: an import of ours that
names a wrong module or attribute, a call with a wrong type across parts, or a write to (or
a wrong key of) the read-only job spec, or a worker's coordinator call with the wrong
request, is an error."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "typecheck.py"

# Each line marked with the error code mypy must report on it; unmarked lines must pass.
# The modules are small ones of four parts, so that a cold cache costs seconds, not torch's.
PROBE = """\
from shardps.proto import names
from shardps.proto.names import NOPE  # attr-defined
import shardps.worker.nope  # import-not-found
from shardps.server.coordinator.membership import Membership
from shardps.worker import plugins
from shardps.proto.spec import parse_spec
from shardps.proto import coordinator_pb2
from shardps.worker.coordclient import CoordinatorClient

names.check(1, 2)  # arg-type
plugins.is_allowed(3)  # arg-type
Membership(lease_ms="slow")  # arg-type
ok: bool = plugins.is_allowed("shardps")
spec = parse_spec("")
steps: int = spec["stop"]["max_steps"]
spec["stop"]["max_steps"] = 1  # typeddict-readonly-mutated
spec["stop"]["max_step"]  # typeddict-item


def ask(coordinator: CoordinatorClient) -> None:
    coordinator.call("GetJob", coordinator_pb2.SetLayoutRequest())  # call-overload
    job: coordinator_pb2.JobInfo = coordinator.call("GetJob", coordinator_pb2.GetJobRequest()).job


# Without annotations, its body is checked all the same (check_untyped_defs).
def unannotated():
    names.check("job", 3)  # arg-type
"""


def _typecheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, check=False)


def test_imports_of_ours_resolve_and_are_checked(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run = _typecheck(str(probe))
    assert run.returncode == 1, run.stdout + run.stderr
    expected = {(n, line.rsplit("# ", 1)[1]) for n, line in enumerate(PROBE.splitlines(), 1)
                if "  # " in line}
    reported = set()
    for line in run.stdout.splitlines():
        where, _, rest = line.partition(": error: ")
        if rest:
            path, _, number = where.rpartition(":")
            # No error in our own code. (mypy may name the probe's path of an earlier run: its
            # cache keys the module by name and content.)
            assert Path(path).name == probe.name, line
            reported.add((int(number), rest.rsplit("[", 1)[1].rstrip("]")))
    assert reported == expected, run.stdout


def test_the_linked_tree_is_the_package_dir_of_pyproject():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import typecheck
    finally:
        sys.path.remove(str(SCRIPT.parent))
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {f"shardps.{part}": part for part in typecheck.parts()} == package_dir
