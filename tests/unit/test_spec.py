"""Job spec validation: defaults, and errors that name the key at fault."""

from pathlib import Path

import pytest

from shardps.proto import spec

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = "model: {name: mlp}\ndata: {dataset: digits}\nstop: {max_steps: 10}\n"


def error_of(text: str) -> str:
    with pytest.raises(spec.SpecError) as info:
        spec.parse_spec(text)
    return str(info.value)


def test_minimal_spec_gets_every_default():
    s = spec.parse_spec(MINIMAL)
    assert s["optimizer"] == {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8,
                              "weight_decay": 0.0, "clip_grad_norm": 0.0,
                              "schedule": {"name": "constant", "warmup_steps": 0,
                                           "total_steps": 0, "min_lr": 0.0}}
    assert s["consistency"] == {"mode": "sync", "staleness": 0}
    assert s["stop"]["target"] is None
    assert list(s) == list(spec.SCHEMA)


def test_normalised_spec_round_trips_through_its_yaml():
    s = spec.parse_spec((ROOT / "examples" / "digits.yaml").read_text())
    assert spec.parse_spec(spec.dump_spec(s)) == s


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "bogus: 1\n", "bogus: unknown key"),
    ("model: {name: mlp}\ndata: {dataset: digits, bs: 2}\nstop: {max_steps: 1}\n", "data.bs: unknown key"),
    (MINIMAL + "optimizer: {lr: -1}\n", "optimizer.lr: must be > 0, got -1"),
    (MINIMAL + "optimizer: {lr: .nan}\n", "optimizer.lr: must be finite"),
    (MINIMAL + "optimizer: {betas: [0.9]}\n", "optimizer.betas: must be a list of two"),
    (MINIMAL + "optimizer: {betas: [0.9, 1.0]}\n", "optimizer.betas[1]: must be < 1"),
    ("model: {name: resnet9000}\ndata: {dataset: digits}\nstop: {max_steps: 1}\n",
     "model.name: unknown model 'resnet9000'"),
    ("model: {name: mlp}\ndata: {dataset: imagenet}\nstop: {max_steps: 1}\n", "data.dataset: unknown dataset"),
    ("data: {dataset: digits}\nstop: {max_steps: 1}\n", "model.name: is required"),
    (MINIMAL + "cluster: {servers: 0}\n", "cluster.servers: must be >= 1"),
    (MINIMAL + "cluster: {workers: 2.5}\n", "cluster.workers: must be an integer"),
    (MINIMAL + "consistency: {mode: eventual}\n", "consistency.mode: must be one of sync, ssp, async"),
    (MINIMAL + "consistency: {mode: sync, staleness: 2}\n", "consistency.staleness: only applies to mode ssp"),
    (MINIMAL + "transport: {dtype: int8}\n", "transport.dtype: must be one of"),
    (MINIMAL + "data: {dataset: digits, shuffle: 'yes'}\n", "data.shuffle: must be true or false"),
    ("model: {name: mlp}\ndata: {dataset: digits}\n", "stop: needs at least one of"),
    ("model: {name: mlp}\ndata: {dataset: digits}\nstop: {target: {metric: accuracy, value: 97}}\n",
     "stop.target.value: accuracy is a fraction"),
    ("model: {name: mlp}\ndata: {dataset: digits}\nstop: {target: {metric: auc, value: 0.9}}\n",
     "stop.target.metric: must be one of"),
    ("model: [mlp]\ndata: {dataset: digits}\nstop: {max_steps: 1}\n", "model: must be a mapping"),
    ("- just\n- a list\n", "a job spec must be a YAML mapping"),
    ("model: {name: mlp\n", "not valid YAML"),
    (MINIMAL + "name: 'has space'\n", "name: must be 1-63 letters"),
])
def test_bad_specs_are_refused_naming_the_key(text, message):
    assert message in error_of(text)


def test_import_paths_are_accepted_for_models_and_data():
    s = spec.parse_spec("model: {name: 'mypkg.models:build'}\ndata: {dataset: 'mypkg.data:load'}\n"
                        "stop: {max_steps: 1}\n")
    assert s["model"]["name"] == "mypkg.models:build"


def test_yaml_style_exponents_are_numbers():
    assert spec.parse_spec(MINIMAL + "optimizer: {eps: 1e-6}\n")["optimizer"]["eps"] == 1e-6


def test_metric_direction():
    assert spec.metric_improves("accuracy", 0.9, 0.8)
    assert not spec.metric_improves("accuracy", 0.81, 0.8, min_delta=0.02)
    assert spec.metric_improves("loss", 0.5, 0.8)


def test_default_local_job_is_the_digits_example():
    packaged = (ROOT / "client" / "default_job.yaml").read_text()
    assert packaged == (ROOT / "examples" / "digits.yaml").read_text()
