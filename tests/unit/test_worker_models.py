"""Built-in models build and run on their datasets; build_model enforces flattenable models."""

import os

import pytest
import torch
from torch import nn

from shardps.proto import layout, spec
from shardps.worker import models, plugins, tasks
from shardps.worker.datasets import load_dataset
from shardps.worker.models import build_model

SMALL_TEXT = {"max_chars": 5000, "seq_len": 16}
PAIRS = [  # (model, dataset, dataset kwargs)
    ("mlp", "digits", {}),
    ("mlp", "regression", {"n_samples": 50}),
    ("cnn", "digits", {}),
    ("gru", "text", SMALL_TEXT),
    ("transformer", "text", SMALL_TEXT),
]


def test_registry_is_exactly_the_spec_builtins():
    assert tuple(models.MODELS) == spec.BUILTIN_MODELS


@pytest.mark.parametrize("model_name,data_name,data_kwargs", PAIRS)
def test_builtin_builds_runs_and_flattens(model_name, data_name, data_kwargs):
    data = load_dataset(data_name, data_kwargs, seed=0)
    torch.manual_seed(3)
    model = build_model(model_name, {}, data.info)
    out = model(data.train_x[:5])
    if data.task == "classification":
        assert out.shape == (5, data.info["num_classes"])
    elif data.task == "regression":
        assert out.numel() == 5
    else:
        assert out.shape == (5, data.info["seq_len"], data.info["vocab_size"])
    loss = tasks.loss(data.task, out, data.train_y[:5])
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    names = [p.name for p in layout.layout_of(model).params]
    assert list(model.state_dict()) == names
    # Same seed, same initial weights: every rank builds the same model.
    torch.manual_seed(3)
    twin = build_model(model_name, {}, data.info)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_mlp_kwargs_set_hidden_widths():
    data = load_dataset("digits", {}, seed=0)
    model = build_model("mlp", {"hidden": [32]}, data.info)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(32, 64), (32,), (10, 32), (10,)]
    with pytest.raises(ValueError, match="model 'mlp'"):
        build_model("mlp", {"widths": [3]}, data.info)


def test_transformer_is_causal():
    data = load_dataset("text", SMALL_TEXT, seed=0)
    torch.manual_seed(0)
    model = build_model("transformer", {"d_model": 32, "n_layers": 1, "n_heads": 2}, data.info)
    x = data.train_x[:2].clone()
    before = model(x)
    x[:, -1] = (x[:, -1] + 1) % data.info["vocab_size"]
    after = model(x)
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-6)  # the past ignores the future
    assert not torch.allclose(before[:, -1], after[:, -1])


def user_linear(info, scale=1.0):
    model = nn.Linear(info["num_features"], info["num_classes"])
    model.scale = scale
    return model


def user_batchnorm(info):
    return nn.Sequential(nn.Linear(info["num_features"], 4), nn.BatchNorm1d(4))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight


def user_tied(info):
    return _Tied()


def test_import_path_factory_gets_info_and_kwargs():
    data = load_dataset("digits", {}, seed=0)
    model = build_model(f"{__name__}:user_linear", {"scale": 2.0}, data.info)
    assert isinstance(model, nn.Linear) and model.out_features == 10 and model.scale == 2.0


@pytest.mark.parametrize("factory", ["user_batchnorm", "user_tied"])
def test_models_with_unshipped_state_are_rejected(factory):
    data = load_dataset("digits", {}, seed=0)
    with pytest.raises(ValueError, match="state_dict has entries that are not parameters"):
        build_model(f"{__name__}:{factory}", {}, data.info)


def test_model_that_needs_other_data_says_so():
    data = load_dataset("digits", {}, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("gru", {}, data.info)


def test_allow_import_needs_the_factory_itself_under_an_allowed_prefix(tmp_path, monkeypatch):
    (tmp_path / "jobpkg").mkdir()
    (tmp_path / "jobpkg" / "__init__.py").write_text(
        "import functools\nfrom os import system\nfrom subprocess import Popen\n\n"
        "def build(info):\n    return None\n\nclass Net:\n    pass\n\n"
        "partial = functools.partial(build)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_allowed_prefixes", None)
    plugins.allow_imports(["jobpkg"])
    assert plugins.import_factory("jobpkg:build").__name__ == "build"
    assert plugins.import_factory("jobpkg:Net").__name__ == "Net"
    for name, module in [("system", "posix"), ("Popen", "subprocess"), ("partial", "functools")]:
        with pytest.raises(ValueError, match=f"is defined in module '{module}', which is not allowed"):
            plugins.import_factory(f"jobpkg:{name}")
    with pytest.raises(ValueError, match="not allowed"):  # a module's own attributes are no way out
        plugins.import_factory("jobpkg:__class__")
    plugins.allow_imports(None)  # without --allow-import every module is trusted, as documented
    assert plugins.import_factory("jobpkg:system") is os.system
