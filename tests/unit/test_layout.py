"""Layouts: contiguous offsets, fingerprints, validation and unflattening."""

import pytest
import torch

from shardps.proto import layout


def test_offsets_are_contiguous_and_fingerprint_depends_on_names_and_shapes():
    a = layout.make_layout([("w", (3, 4)), ("b", (4,))])
    assert [(p.name, p.offset) for p in a.params] == [("w", 0), ("b", 12)]
    assert a.total == 16
    assert layout.make_layout([("w", (3, 4)), ("b", (4,))]).fingerprint == a.fingerprint
    assert layout.make_layout([("w", (4, 3)), ("b", (4,))]).fingerprint != a.fingerprint
    layout.check_layout(a)


def test_layout_of_module_matches_state_dict():
    module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    lay = layout.layout_of(module)
    assert [p.name for p in lay.params] == list(module.state_dict())
    assert lay.total == sum(p.numel() for p in module.parameters())


def test_unflatten_gives_independent_tensors_of_the_right_shapes():
    lay = layout.make_layout([("w", (2, 3)), ("b", (3,))])
    flat = torch.arange(9, dtype=torch.float32)
    sd = layout.unflatten(flat, lay)
    assert torch.equal(sd["w"], torch.arange(6.0).view(2, 3))
    flat.zero_()
    assert sd["b"].tolist() == [6.0, 7.0, 8.0]
    with pytest.raises(ValueError, match="needs 9"):
        layout.unflatten(torch.zeros(8), lay)


@pytest.mark.parametrize("mutate, message", [
    (lambda lay: setattr(lay, "total", 5), "total"),
    (lambda lay: setattr(lay.params[1], "offset", 7), "offset"),
    (lambda lay: setattr(lay.params[1], "name", "w"), "twice"),
    (lambda lay: setattr(lay, "fingerprint", "0" * 16), "fingerprint"),
    (lambda lay: lay.ClearField("params"), "no parameters"),
    (lambda lay: lay.tables.extend(["emb", "x" * 200]), r"layout.tables\[1\]: a table is named"),
    (lambda lay: lay.tables.extend(["emb", "bag", "emb"]), "names 'emb' twice"),
])
def test_inconsistent_layouts_are_refused(mutate, message):
    lay = layout.make_layout([("w", (2, 3)), ("b", (3,))])
    mutate(lay)
    with pytest.raises(ValueError, match=message):
        layout.check_layout(lay)
