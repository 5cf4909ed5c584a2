"""worker/exported.py: an export's dynamic tables (ids/rows pairs) load back into the model
they came from, which then reads exactly the exported rows (zeros for other ids)."""

import pytest
import torch
from torch import nn

from shardps.proto.tables import TableRowsError
from shardps.worker.embedding import Embedding, EmbeddingBag
from shardps.worker.exported import ExportedRows, load_exported


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fixed = Embedding(5, 2)
        self.dyn = EmbeddingBag(None, 2, mode="sum")
        self.head = nn.Linear(4, 1)

    def forward(self, small, big):
        return self.head(torch.cat([self.fixed(small), self.dyn(big)], 1))


def export_of(model: Model) -> dict[str, torch.Tensor]:
    ids = torch.tensor([-(2**63), -7, 3, 2**63 - 1])
    rows = torch.arange(8, dtype=torch.float32).view(4, 2)
    return {"fixed.weight": torch.randn(5, 2), "head.weight": torch.randn(1, 4),
            "head.bias": torch.randn(1), "dyn.ids": ids, "dyn.rows": rows}


def test_an_export_loads_back_and_reads_the_exported_rows():
    model = Model()
    state = export_of(model)
    source = load_exported(model, state)
    assert torch.equal(model.fixed.weight, state["fixed.weight"])
    big = torch.tensor([[3, 2**63 - 1], [-7, 99]])  # 99 was not exported: zeros
    got = model.dyn(big)
    assert torch.equal(got, torch.tensor([[4.0 + 6, 5 + 7], [2, 3]]))
    assert torch.equal(source.fetch("dyn", torch.tensor([-(2**63), 0])),
                       torch.tensor([[0.0, 1], [0, 0]]))
    out = model(torch.tensor([0, 4]), big)
    assert out.shape == (2, 1)


def test_an_empty_dynamic_table_reads_zeros():
    source = ExportedRows({"t": (torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3))})
    assert torch.equal(source.fetch("t", torch.tensor([1, 2])), torch.zeros(2, 3))


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"dyn.ids": None}, KeyError, "no dyn.ids / dyn.rows"),
    ({"dyn.rows": torch.zeros(4, 3)}, TableRowsError, "width 2"),
    ({"dyn.ids": torch.tensor([3, -7, 1, 2])}, TableRowsError, "strictly increasing"),
    ({"dyn.ids": torch.tensor([1, 2, 3, 4], dtype=torch.int32)}, TableRowsError, "int64"),
    ({"dyn.rows": torch.full((4, 2), float("nan"))}, TableRowsError, "non-finite"),
    ({"dyn.rows": torch.zeros(3, 2)}, TableRowsError, "fp32\\[4, 2\\]"),
    ({"extra": torch.zeros(1)}, RuntimeError, "Unexpected key"),
])
def test_a_bad_export_is_refused_naming_the_table(change, error, message):
    model = Model()
    state = export_of(model)
    for key, value in change.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    with pytest.raises(error, match=message):
        load_exported(model, state)
