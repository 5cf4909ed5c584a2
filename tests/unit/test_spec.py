"""Job spec validation: defaults, and errors that name the key at fault."""

import re
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
                              "weight_decay": 0.0, "clip_grad_norm": 0.0, "freeze_variance_after": 0,
                              "precondition_pushes": False, "worker_momentum": False,
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
    (MINIMAL + "cluster: {servers: 2, replicas: 3}\n",
     "cluster.replicas: each copy of a shard needs a server of its own: 3 > cluster.servers 2"),
    (MINIMAL + "cluster: {servers: 4, shards: 3}\n",
     "cluster.shards: each server needs a shard of its own: 3 < cluster.servers 4"),
    (MINIMAL + "consistency: {mode: eventual}\n", "consistency.mode: must be one of sync, ssp, async"),
    (MINIMAL + "consistency: {mode: sync, staleness: 2}\n", "consistency.staleness: only applies to mode ssp"),
    (MINIMAL + "transport: {dtype: int8}\n", "transport.dtype: must be one of"),
    (MINIMAL + "transport: {compress: gzip}\n", "transport.compress: 'gzip': expected topk[:RATIO]"),
    (MINIMAL + "transport: {compress: 'topk:2'}\n", "transport.compress: 'topk:2': topk ratio must be in (0, 1]"),
    (MINIMAL + "transport: {compress: 'int8:x'}\n", "transport.compress: 'int8:x': invalid literal"),
    (MINIMAL + "transport: {compress: 8}\n", "transport.compress: must be none, topk[:RATIO]"),
    (MINIMAL + "transport: {compress_pull: int8, dtype: bfloat16}\n",
     "transport.compress_pull: needs dtype float32, not bfloat16"),
    (MINIMAL + "transport: {overlap: 'on'}\n", "transport.overlap: must be true or false"),
    (MINIMAL + "transport: {compress_warmup_steps: 5}\n",
     "transport.compress_warmup_steps: needs transport.compress, not none"),
    (MINIMAL + "transport: {compress: sign, compress_warmup_steps: -1}\n",
     "transport.compress_warmup_steps: must be >= 0"),
    (MINIMAL + "transport: {compress: sign, compress_warmup: int8}\n",
     "transport.compress_warmup: needs transport.compress_warmup_steps > 0"),
    (MINIMAL + "transport: {compress: sign, compress_warmup_steps: 4, compress_warmup: int9}\n",
     "transport.compress_warmup: "),
    (MINIMAL + "optimizer: {freeze_variance_after: 1.5}\n",
     "optimizer.freeze_variance_after: must be an integer"),
    (MINIMAL + "optimizer: {precondition_pushes: 1}\n",
     "optimizer.precondition_pushes: must be true or false"),
    (MINIMAL + "optimizer: {precondition_pushes: true, freeze_variance_after: 5}\n",
     "optimizer.precondition_pushes: needs transport.compress, not none"),
    (MINIMAL + "optimizer: {precondition_pushes: true}\ntransport: {compress: sign}\n",
     "optimizer.precondition_pushes: needs optimizer.freeze_variance_after > 0"),
    (MINIMAL + "optimizer: {precondition_pushes: true, freeze_variance_after: 5}\n"
     "transport: {compress: sign, compress_warmup_steps: 4}\n",
     "optimizer.precondition_pushes: needs transport.compress_warmup_steps (4) equal to "
     "optimizer.freeze_variance_after (5)"),
    (MINIMAL + "optimizer: {worker_momentum: 1}\n", "optimizer.worker_momentum: must be true or false"),
    (MINIMAL + "optimizer: {worker_momentum: true, freeze_variance_after: 5}\n"
     "transport: {compress: sign, compress_warmup_steps: 5}\n",
     "optimizer.worker_momentum: needs optimizer.precondition_pushes: true"),
    (MINIMAL + "optimizer: {worker_momentum: true, precondition_pushes: true}\n",
     "optimizer.precondition_pushes: needs transport.compress, not none"),
    (MINIMAL + "data: {dataset: digits, shuffle: 'yes'}\n", "data.shuffle: must be true or false"),
    ("model: {name: mlp}\ndata: {dataset: digits}\n", "stop: needs at least one of"),
    ("model: {name: mlp}\ndata: {dataset: digits}\nstop: {target: {metric: accuracy, value: 97}}\n",
     "stop.target.value: accuracy is a fraction"),
    ("model: {name: mlp}\ndata: {dataset: digits}\nstop: {target: {metric: f1, value: 0.9}}\n",
     "stop.target.metric: must be one of"),
    ("model: {name: mlp}\ndata: {dataset: digits}\nstop: {target: {metric: auc, value: 1.5}}\n",
     "stop.target.value: auc is a fraction in [0, 1]"),
    (MINIMAL + "data: {dataset: files}\n", "data.files.path: is required for dataset files"),
    (MINIMAL + "data: {dataset: files, files: {path: d, holdout: 0}}\n",
     "data.files.test: dataset files needs test files or holdout >= 1"),
    (MINIMAL + "data: {dataset: digits, files: {path: d}}\n", "data.files.path: only applies to dataset files"),
    (MINIMAL + "data: {dataset: digits, files: {test: d}}\n", "data.files.test: only applies to dataset files"),
    (MINIMAL + "data: {dataset: files, files: {path: 7}}\n", "data.files.path: must be a string"),
    (MINIMAL + "data: {dataset: files, files: {path: d, format: parquet}}\n",
     "data.files.format: must be one of ctr"),
    (MINIMAL + "data: {dataset: files, files: {path: d, skip_bad: 1}}\n", "data.files.skip_bad: must be true or false"),
    ("model: [mlp]\ndata: {dataset: digits}\nstop: {max_steps: 1}\n", "model: must be a mapping"),
    ("- just\n- a list\n", "a job spec must be a YAML mapping"),
    ("model: {name: mlp\n", "not valid YAML"),
    (MINIMAL + "name: 'has space'\n", "name: must be 1-63 letters"),
])
def test_bad_specs_are_refused_naming_the_key(text, message):
    assert message in error_of(text)


def test_a_file_dataset_and_binary_metrics():
    s = spec.parse_spec("model: {name: mlp}\ndata: {dataset: files, files: {path: data/ctr}}\n"
                        "stop: {target: {metric: auc, value: 0.7}}\n")
    assert s["data"]["files"] == {"path": "data/ctr", "format": "ctr", "test": "", "holdout": 1,
                                  "prefetch": 4, "skip_bad": False}
    assert s["stop"]["target"] == {"metric": "auc", "value": 0.7}
    assert spec.metric_improves("auc", 0.71, 0.7) and not spec.metric_improves("auc", 0.69, 0.7)
    assert spec.metric_improves("logloss", 0.4, 0.5) and not spec.metric_improves("logloss", 0.6, 0.5)


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


# -- limits (issue 10: hostile specs) ---------------------------------------------------------

LOADERS = [spec._Loader, spec._PyLoader]  # libyaml's parser (where installed) and pure Python


@pytest.mark.parametrize("loader", LOADERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("text, message", [
    ("a: &x [1]\nb: *x\n", "YAML anchors and aliases are not allowed in a job spec (line 1, column 4)"),
    ("a: &x 1\n", "anchors and aliases are not allowed"),
    ("a: [" * 33 + "]" * 33 + "\n", f"may nest at most {spec.MAX_DEPTH} levels"),
    ("[" * 5000 + "]" * 5000, f"may nest at most {spec.MAX_DEPTH} levels"),
    ("a: [" + ", ".join(["1"] * spec.MAX_NODES) + "]\n", f"at most {spec.MAX_NODES} values"),
])
def test_documents_beyond_the_limits_are_refused_as_they_are_read(loader, text, message):
    with pytest.raises(spec.SpecError, match=re.escape(message)):
        spec.load_yaml(text, loader)


@pytest.mark.parametrize("loader", LOADERS, ids=lambda c: c.__name__)
def test_documents_at_the_limits_load(loader):
    assert spec.load_yaml("a: " + "[" * (spec.MAX_DEPTH - 1) + "]" * (spec.MAX_DEPTH - 1), loader)
    values = spec.load_yaml("a: [" + ", ".join(["1"] * (spec.MAX_NODES - 3)) + "]\n", loader)
    assert len(values["a"]) == spec.MAX_NODES - 3  # + the root, its key and the list


def test_an_alias_bomb_is_refused_before_it_expands():
    bomb = "\n".join([f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 12)])
    assert "aliases are not allowed" in error_of('l0: &l0 ["lol"]\n' + bomb + "\nmodel: *l11\n")


def test_size_is_bounded_in_utf8_bytes():
    assert "at most 65536 bytes, this one has 65538" in error_of(MINIMAL + "#" * (65536 - len(MINIMAL)) + "é")
    spec.parse_spec(MINIMAL + "#" * (65536 - len(MINIMAL) - 1) + "\n")


def test_the_normalised_spec_must_fit_too():
    # Escaped on output: each of these 2-byte characters becomes 4 bytes ("\xE9").
    text = "model: {name: mlp, kwargs: {s: \"" + "é" * 30_000 + "\"}}\ndata: {dataset: digits}\n" \
           "stop: {max_steps: 10}\n"
    spec.parse_spec(text)
    assert "the normalised spec (defaults filled in, as workers read it): a job spec may have at " \
           "most 65536 bytes" in error_of_normalise(text)
    # Defaults add values: a spec just under the limit on values is over it once normalised.
    text = MINIMAL + "model: {name: mlp, kwargs: {v: [" + ", ".join(["1"] * (spec.MAX_NODES - 40)) + "]}}\n"
    spec.parse_spec(text)
    assert f"at most {spec.MAX_NODES} values" in error_of_normalise(text)


def error_of_normalise(text: str) -> str:
    with pytest.raises(spec.SpecError) as info:
        spec.normalise(text)
    return str(info.value)


def test_the_canonical_yaml_has_no_aliases_even_for_shared_objects():
    s = spec.parse_spec(MINIMAL)
    shared = [1, 2]
    s["model"]["kwargs"] = {"a": shared, "b": shared}
    text = spec.dump_spec(s)
    assert "&" not in text and "*" not in text
    assert spec.parse_spec(text)["model"]["kwargs"] == {"a": [1, 2], "b": [1, 2]}
    normalised = spec.normalise(text)
    assert normalised.spec == spec.parse_spec(normalised.text)


@pytest.mark.parametrize("text", [
    MINIMAL.replace("digits", "x" * 100_00),
    MINIMAL + "name: " + "n" * 20_000 + "\n",
    MINIMAL + "y" * 20_000 + ": 1\n",
    MINIMAL + "model: {name: mlp, kwargs: [" + ", ".join(["1"] * 3000) + "]}\n",
    MINIMAL + "seed: " + "9" * 4000 + "\n",
    MINIMAL + "seed: " + "9" * 5000 + "\n",
    MINIMAL + "optimizer: {betas: [" + ", ".join(["0.5"] * 3000) + "]}\n",
])
def test_error_messages_show_at_most_a_short_part_of_the_value(text):
    message = error_of(text)
    assert len(message) <= spec.MAX_MESSAGE, message


def test_show_cuts_values_and_survives_integers_too_long_to_print():
    assert spec.show("abc") == "'abc'"
    assert len(spec.show("x" * 1000)) == spec.MAX_SHOWN and spec.show("x" * 1000).endswith("...")
    assert spec.show(10**5000) == "<an integer of 16610 bits>"


# Every number of the schema, at its bounds and past them: (key, YAML at the bound, past it).
RANGES = [
    ("seed", "0", "-1"), ("seed", str(2**63 - 1), str(2**63)),
    ("data.batch_size", "1", "0"), ("data.batch_size", str(2**20), str(2**20 + 1)),
    ("optimizer.lr", str(spec.FP32_MAX), "3.5e+38"), ("optimizer.lr", "1.0e-300", "0"),
    ("optimizer.eps", "1.0e-30", "1.0e-31"), ("optimizer.eps", str(spec.FP32_MAX), "1.0e+39"),
    ("optimizer.weight_decay", "1000", "1000.5"), ("optimizer.weight_decay", "0", "-0.1"),
    ("optimizer.clip_grad_norm", "3.0e+38", "1.0e+39"),
    ("optimizer.schedule.warmup_steps", str(2**31 - 1), str(2**31)),
    ("optimizer.schedule.total_steps", str(2**31 - 1), str(2**31)),
    ("optimizer.schedule.min_lr", "0", "-1"),
    ("consistency.staleness", "0", "-1"),
    ("cluster.servers", "1024", "1025"), ("cluster.workers", "4096", "4097"),
    ("cluster.replicas", "1", "0"), ("cluster.replicas", "8", "9"),
    ("cluster.shards", "1", "0"), ("cluster.shards", "1024", "1025"),
    ("transport.chunk_bytes", "4096", "4095"), ("transport.chunk_bytes", str(16 << 20), str((16 << 20) + 1)),
    ("transport.bucket_bytes", "4096", "4095"), ("transport.bucket_bytes", str(1 << 30), str((1 << 30) + 1)),
    ("stop.max_steps", str(2**31 - 1), str(10**30)),
    ("stop.max_epochs", "1000000", "1000000.5"),
    ("stop.patience", str(2**31 - 1), str(2**31)),
    ("stop.min_delta", "3.0e+38", "1.0e+39"),
    ("stop.eval_every", str(2**31 - 1), str(2**31)), ("stop.eval_every", "1", "0"),
    ("checkpoint.every_steps", str(2**31 - 1), str(2**63)),
    ("checkpoint.keep", "1000", "1001"),
    ("checkpoint.worker_copies", "0", "-1"), ("checkpoint.worker_copies", "8", "9"),
    ("optimizer.freeze_variance_after", str(2**31 - 1), "-1"),
    ("transport.compress_warmup_steps", str(2**31 - 1), "-1"),
    ("data.files.holdout", "0", "-1"), ("data.files.holdout", str(1 << 20), str((1 << 20) + 1)),
    ("data.files.prefetch", "1", "0"), ("data.files.prefetch", "1024", "1025"),
    ("tables.lr", str(spec.FP32_MAX), "3.5e+38"), ("tables.lr", "0", "-1"),
    ("tables.eps", "1.0e-30", "1.0e-31"), ("tables.eps", "0", "-1"), ("tables.weight_decay", "1000", "1000.5"),
    ("tables.initial_accumulator_value", "0", "-1"),
    ("tables.admit_after", "1", "0"), ("tables.admit_after", str(2**31 - 1), str(2**31)),
    ("tables.evict_after_steps", "0", "-1"), ("tables.evict_after_steps", str(2**31 - 1), str(2**31)),
    ("tables.max_rows", "0", "-1"), ("tables.max_rows", str(2**40), str(2**40 + 1)),
    ("tables.max_bytes", "0", "-1"), ("tables.max_bytes", str(2**50), str(2**50 + 1)),
    ("tables.sketch_width", "64", "32"), ("tables.sketch_width", str(1 << 24), str(1 << 25)),
    ("tables.sketch_depth", "1", "0"), ("tables.sketch_depth", "8", "9"),
    ("tables.sketch_halve_every", "0", "-1"), ("tables.sketch_halve_every", str(2**31 - 1), str(2**31)),
]


def with_value(key: str, value: str) -> str:
    parts = key.split(".")
    line = "".join(f"{p}: {{" for p in parts[:-1]) + f"{parts[-1]}: {value}" + "}" * (len(parts) - 1)
    text = MINIMAL if parts[0] != "stop" else MINIMAL.replace("stop: {max_steps: 10}\n", "")
    if parts[0] == "stop" and parts[1] not in ("max_steps", "max_epochs"):
        line = line.replace("stop: {", "stop: {max_steps: 10, ")
    if parts[0] == "data":
        line = line.replace("data: {", "data: {dataset: digits, ")
    if key == "consistency.staleness":
        line = "consistency: {mode: ssp, staleness: " + value + "}"
    if key == "transport.compress_warmup_steps":  # needs a compressed push
        line = "transport: {compress: sign, compress_warmup_steps: " + value + "}"
    if key == "cluster.replicas":  # each copy needs a server of its own
        line = "cluster: {servers: 16, replicas: " + value + "}"
    return text + line + "\n"


@pytest.mark.parametrize("key, inside, outside", RANGES)
def test_every_number_has_a_range_and_an_error_naming_its_key(key, inside, outside):
    spec.parse_spec(with_value(key, inside))
    assert error_of(with_value(key, outside)).startswith(key + ":")


def test_every_number_of_the_schema_is_covered_by_a_range_test():
    def numbers(schema, prefix=""):
        for key, rule in schema.items():
            if isinstance(rule, dict):
                yield from numbers(rule, f"{prefix}{key}.")
            elif rule[0].__name__ == "check" and rule[0].__qualname__.split(".")[0] in ("_int", "_float"):
                yield prefix + key
    assert set(numbers(spec.SCHEMA)) - {"stop.target.value"} == {key for key, _, _ in RANGES}


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "optimizer: {lr: " + "9" * 400 + "}\n", "optimizer.lr: must be finite"),
    (MINIMAL + "optimizer: {lr: 1e999}\n", "optimizer.lr: must be finite"),
    ("model: {name: mlp}\ndata: {dataset: digits}\nstop: {target: {metric: loss, value: -0.5}}\n",
     "stop.target.value: must be >= 0"),
    ("model: {name: mlp}\ndata: {dataset: digits}\nstop: {target: {metric: perplexity, value: 0.5}}\n",
     "stop.target.value: perplexity is at least 1"),
    (MINIMAL + "optimizer: {schedule: {name: cosine, warmup_steps: 10}}\n",
     "optimizer.schedule.warmup_steps: cosine needs more steps than its warmup (10 <= 10)"),
    (MINIMAL + "optimizer: {name: adamw, lr: 0.5, weight_decay: 3}\n",
     "optimizer.weight_decay: adamw needs lr * weight_decay <= 1, got 1.5"),
])
def test_ranges_that_depend_on_other_keys(text, message):
    assert message in error_of(text)


def test_clamping_mode_brings_stored_numbers_into_range_and_says_so():
    notes: list[str] = []
    s = spec.parse_spec(MINIMAL.replace("10}", f"{10**30}}}") + "seed: -5\noptimizer: {eps: 1.0e-50}\n",
                        clamped=notes)
    assert (s["stop"]["max_steps"], s["seed"], s["optimizer"]["eps"]) == (spec.MAX_STEPS, 0, spec.MIN_EPS)
    assert notes == ["seed: -5 clamped to 0", "optimizer.eps: 1e-50 clamped to 1e-30",
                     f"stop.max_steps: {10**30} clamped to {spec.MAX_STEPS}"]
    with pytest.raises(spec.SpecError):  # and only then: a submit is never clamped
        spec.parse_spec(MINIMAL.replace("10}", f"{10**30}}}"))
    with pytest.raises(spec.SpecError, match="optimizer.lr: must be > 0"):  # nothing to clamp to
        spec.parse_spec(MINIMAL + "optimizer: {lr: 0}\n", clamped=[])


def test_transport_compress_defaults_to_none_and_keeps_a_setting_as_written():
    assert spec.parse_spec(MINIMAL)["transport"]["compress"] == "none"
    for setting in ("none", "int8", "int8:128", "topk:0.05", "sign"):
        text = MINIMAL + f"transport: {{compress: '{setting}'}}\n"
        assert spec.parse_spec(text)["transport"]["compress"] == setting


def test_per_table_settings_override_the_job_wide_ones_for_their_table():
    s = spec.parse_spec(MINIMAL + "tables: {max_rows: 100, admit_after: 2, "
                                  "per_table: {user_emb: {max_rows: 7}, tower.ids: {optimizer: adagrad}}}\n")
    assert spec.table_settings(s, "user_emb")["max_rows"] == 7
    assert spec.table_settings(s, "user_emb")["admit_after"] == 2  # the job-wide value
    assert spec.table_settings(s, "tower.ids")["optimizer"] == "adagrad"
    assert spec.table_settings(s, "tower.ids")["max_rows"] == 100
    other = spec.table_settings(s, "other")
    assert other["max_rows"] == 100 and "per_table" not in other
    # The normalised text reads back the same (workers parse what the coordinator stored).
    assert spec.parse_spec(spec.normalise(MINIMAL + "tables: {per_table: {e: {max_rows: 3}}}\n").text)[
        "tables"]["per_table"]["e"]["max_rows"] == 3


@pytest.mark.parametrize("tables, message", [
    ("{per_table: {emb: {admit_after: 0}}}", "tables.per_table.emb.admit_after: must be >= 1"),
    ("{per_table: {emb: {nope: 1}}}", "tables.per_table.emb.nope: unknown key"),
    ("{per_table: {emb: 3}}", "tables.per_table.emb: must be a mapping"),
    ("{per_table: {'a b': {}}}", "tables.per_table.a b: a table is named by its module path"),
    ("{per_table: {emb: {eps: 1.0e-31}}}", "tables.per_table.emb.eps: must be 0"),
    ("{sketch_width: 100}", "tables.sketch_width: must be a power of two, got 100"),
    ("{per_table: {emb: {sketch_width: 96}}}", "tables.per_table.emb.sketch_width: must be a power of two"),
])
def test_bad_table_settings_are_refused_naming_the_key(tables, message):
    assert error_of(MINIMAL + f"tables: {tables}\n").startswith(message)
