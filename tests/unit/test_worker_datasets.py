"""Built-in datasets: shapes, determinism, splits, and user dataset factories."""

import subprocess
import sys

import pytest
import torch

from shardps.proto import spec
from shardps.worker import datasets
from shardps.worker.datasets import Dataset, load_dataset


def test_registry_is_exactly_the_spec_builtins():
    assert (*datasets.DATASETS, "files") == spec.BUILTIN_DATASETS


def test_digits_is_a_stratified_deterministic_split():
    data = load_dataset("digits", {}, seed=0)
    assert data.task == "classification"
    assert data.train_x.shape[1:] == (64,) and data.train_x.dtype == torch.float32
    assert len(data.train_x) + len(data.test_x) == 1797
    assert 0.18 < len(data.test_x) / 1797 < 0.22
    assert data.train_x.min() >= 0 and data.train_x.max() <= 1
    assert data.info == {"num_features": 64, "input_shape": (1, 8, 8), "num_classes": 10}
    # Stratified: every class is ~20% test.
    for label in range(10):
        n_test = int((data.test_y == label).sum())
        n_all = n_test + int((data.train_y == label).sum())
        assert abs(n_test - 0.2 * n_all) <= 1
    again = load_dataset("digits", {}, seed=0)
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.train_y, data.train_y)
    other = load_dataset("digits", {}, seed=1)
    assert not torch.equal(other.test_x, data.test_x)


def test_digits_read_from_the_csv_equal_sklearns_load_digits(monkeypatch):
    """The CSV path (no sklearn import) gives bitwise what sklearn.datasets.load_digits gives,
    and so the same split; the sklearn fallback is the path taken when the file is absent."""
    from sklearn.datasets import load_digits

    assert datasets.digits_csv() is not None, "the sklearn installed here keeps digits.csv.gz elsewhere"
    pixels, labels = datasets._digits_arrays()
    raw = load_digits()
    assert pixels.dtype == raw.data.dtype and labels.dtype == raw.target.dtype
    assert pixels.shape == raw.data.shape == (1797, 64)
    assert (pixels == raw.data).all() and (labels == raw.target).all()
    from_csv = load_dataset("digits", {}, seed=3)
    monkeypatch.setattr(datasets, "digits_csv", lambda: None)
    from_sklearn = load_dataset("digits", {}, seed=3)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        a, b = getattr(from_csv, name), getattr(from_sklearn, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert from_csv.info == from_sklearn.info


def test_digits_load_without_importing_sklearn():
    code = ("import sys; from shardps.worker.datasets import load_dataset; "
            "load_dataset('digits', {}, 0); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "False"


def test_regression_follows_kwargs_and_is_linear_without_noise():
    data = load_dataset("regression", {"n_samples": 200, "n_features": 3, "noise": 0.0}, seed=5)
    assert data.task == "regression"
    assert data.train_x.shape == (160, 3) and data.test_x.shape == (40, 3)
    assert data.info["num_features"] == 3 and data.info["num_outputs"] == 1
    x = torch.cat([data.train_x, torch.ones(160, 1)], dim=1)
    coef = torch.linalg.lstsq(x, data.train_y.unsqueeze(1)).solution
    residual = x @ coef - data.train_y.unsqueeze(1)
    assert residual.abs().max() < 1e-4
    assert torch.equal(load_dataset("regression", {"n_samples": 200, "n_features": 3,
                                                   "noise": 0.0}, seed=5).test_y, data.test_y)


def test_text_windows_predict_the_next_character():
    data = load_dataset("text", {"max_chars": 20_000, "seq_len": 32}, seed=0)
    assert data.task == "language_model"
    assert data.train_x.shape[1] == 32 and data.train_x.dtype == torch.int64
    vocab = data.info["vocab"]
    assert list(vocab) == sorted(set(vocab))
    assert data.info["vocab_size"] == len(vocab) and data.info["seq_len"] == 32
    assert torch.equal(data.train_y[:, :-1], data.train_x[:, 1:])  # shifted by one
    # Non-overlapping windows of a 20k-char corpus, 90% train.
    assert len(data.train_x) == (18_000 - 1) // 32
    text = "".join(vocab[i] for i in data.train_x[0].tolist())
    assert text.isascii() and len(text) == 32
    again = load_dataset("text", {"max_chars": 20_000, "seq_len": 32}, seed=7)
    assert torch.equal(again.train_x, data.train_x)  # no randomness in the corpus


def test_unknown_kwarg_names_the_dataset():
    with pytest.raises(ValueError, match="dataset 'digits'"):
        load_dataset("digits", {"bogus": 1})


def make_tiny(n=10, as_dict=False):
    fields = dict(train_x=torch.randn(n, 4), train_y=torch.arange(n) % 3,
                  test_x=torch.randn(4, 4), test_y=torch.tensor([0, 1, 2, 0]),
                  task="classification")
    return fields if as_dict else Dataset(**fields)


def make_wrong():
    return [1, 2, 3]


@pytest.mark.parametrize("as_dict", [False, True])
def test_import_path_factory_gets_kwargs_and_info_is_derived(as_dict):
    data = load_dataset(f"{__name__}:make_tiny", {"n": 12, "as_dict": as_dict}, seed=0)
    assert len(data.train_x) == 12
    assert data.info == {"num_features": 4, "input_shape": (4,), "num_classes": 3}


def test_import_path_factory_must_return_a_dataset():
    with pytest.raises(ValueError, match="returned list"):
        load_dataset(f"{__name__}:make_wrong", {})
    with pytest.raises(ValueError, match="cannot import"):
        load_dataset("no_such_module_xyz:make", {})
    with pytest.raises(ValueError, match="no attribute"):
        load_dataset(f"{__name__}:missing", {})


def test_dataset_rejects_mismatched_splits_and_unknown_tasks():
    with pytest.raises(ValueError, match="as many targets"):
        Dataset(torch.zeros(3, 2), torch.zeros(2), torch.zeros(1, 2), torch.zeros(1), "regression")
    with pytest.raises(ValueError, match="unknown task"):
        Dataset(torch.zeros(3, 2), torch.zeros(3), torch.zeros(1, 2), torch.zeros(1), "ranking")
