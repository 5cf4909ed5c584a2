"""A user's torch datasets on real daemons in this process (port 0): a sync job whose factory
returns a map-style dataset, and one whose factory returns an IterableDataset, each equal to
one process reading the same order (1e-5)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from shardps.proto import common_pb2
from shardps.worker import tasks
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from shardps.worker.models import build_model
from shardps.worker.torchdata import TorchData
from tests.cluster import Cluster

pytestmark = pytest.mark.timeout(180)

STEPS = 30


class Digits(Dataset):
    """The built-in digits, one sample at a time, as a user's map-style dataset would be."""

    classes = tuple(range(10))

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


class Lines(IterableDataset):
    """A regression stream: y = x . w + 1 for seeded x, the same on every iter()."""

    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=gen)
        self.y = self.x @ torch.arange(1.0, 6.0) + 1

    def __len__(self) -> int:
        return len(self.y)

    def __iter__(self):
        return zip(self.x, self.y.tolist(), strict=True)


def digits_torch():
    data = load_dataset("digits", {}, 0)
    return Digits(data.train_x, data.train_y), Digits(data.test_x, data.test_y)


def lines_torch():
    return TorchData(Lines(90, 1), Lines(20, 2), task="regression")


def job_spec(dataset: str, shuffle: bool) -> dict:
    return {
        "name": "torch-data", "seed": 0,
        "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
        "data": {"dataset": f"{__name__}:{dataset}", "batch_size": 32, "shuffle": shuffle},
        "optimizer": {"lr": 0.01},
        "consistency": {"mode": "sync"},
        "cluster": {"servers": 2, "workers": 3},
        "stop": {"max_steps": STEPS, "eval_every": 1000},
    }


def single_process(spec: dict) -> dict[str, torch.Tensor]:
    """The job trained here on the factory's tensors in the in-memory order (BatchOrder, which
    an iterable's stream follows unshuffled), torch.optim.Adam on the global batch."""
    data = load_dataset(spec["data"]["dataset"])
    assert isinstance(data, TorchData)
    x, y = data.train.x, torch.as_tensor(data.train.y).to(
        torch.float32 if data.task == "regression" else torch.int64)
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"]["name"], spec["model"]["kwargs"], data.info)
    opt = torch.optim.Adam(model.parameters(), lr=spec["optimizer"]["lr"])
    order = BatchOrder(len(y), spec["data"]["batch_size"], spec["data"]["shuffle"], spec["seed"])
    for t in range(STEPS):
        opt.zero_grad()
        index = order.batch(t)
        tasks.loss(data.task, model(x[index]), y[index]).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dataset, shuffle", [("digits_torch", True), ("lines_torch", False)])
def test_sync_on_a_torch_dataset_is_one_process_reading_the_same_order(dataset, shuffle):
    c = Cluster(servers=2, workers=3)
    try:
        spec = job_spec(dataset, shuffle)
        job = c.wait(c.submit(spec), timeout=150)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job.reason
        weights, versions = c.client.export(job.job_id)
    finally:
        c.close()
    assert versions == [STEPS] * 2
    alone = single_process(spec)
    assert weights.keys() == alone.keys()
    diff = max(float((weights[k] - alone[k]).abs().max()) for k in alone)
    print(f"{dataset}: 3 workers, {STEPS} sync steps: max |w - one process| = {diff:.3g}")
    assert diff <= 1e-5
