"""`shardps-worker --allow-import` with a real worker (issue 10, item 8): a job's factory must
itself be defined under an allowed prefix, not merely reachable through an allowed module."""

from __future__ import annotations

import os

from shardps.client.api import CoordinatorClient
from shardps.proto import common_pb2
from tests import harness

# A job package that imports more than it defines.
PACKAGE = '''
from os import system  # noqa: F401 - reachable as mypkg:system, and must not be callable so

from shardps.worker.datasets import digits


def load():
    """A dataset factory defined here: allowed."""
    return digits(0)
'''


def test_a_factory_imported_into_an_allowed_module_is_refused(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text(PACKAGE)
    marker = tmp_path / "ran-a-shell-command"
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    coord = harness.start("shardps-coordinator", "--port", "0")
    harness.start("shardps-server", "--port", "0", "--coordinator", coord.address)
    harness.start("shardps-worker", "--port", "0", "--coordinator", coord.address, "--device", "cpu",
                  "--threads", "1", "--allow-import", "mypkg", env={"PYTHONPATH": path})
    client = CoordinatorClient(coord.address)

    job = client.wait(client.submit(
        "model: {name: mlp}\n"
        f"data: {{dataset: 'mypkg:system', kwargs: {{command: 'touch {marker}'}}}}\n"
        "stop: {max_steps: 5}\n"), timeout_s=120)
    assert not marker.exists(), "the job ran os.system through mypkg"
    assert job.state == common_pb2.JOB_STATE_FAILED, job.reason
    assert "'mypkg:system' is defined in module 'posix'" in job.reason, job.reason
    assert "must be defined under an allowed prefix" in job.reason, job.reason

    # A factory the package defines itself runs.
    job = client.wait(client.submit(
        "model: {name: mlp, kwargs: {hidden: [8]}}\ndata: {dataset: 'mypkg:load'}\n"
        "stop: {max_steps: 5, eval_every: 5}\n"), timeout_s=180)
    assert job.state == common_pb2.JOB_STATE_COMPLETED, job.reason
