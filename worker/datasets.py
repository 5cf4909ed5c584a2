"""Built-in datasets (no downloads) and user dataset factories, as in-memory tensors.

Every rank of a job calls `load_dataset` with the same arguments and must get the same tensors:
built-ins use only seeded torch generators and files that ship with Python.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardps.proto import spec as spec_lib
from shardps.worker import plugins, tasks, torchdata


@dataclass
class Dataset:
    """A train/test split in memory, the task that says how to train on it, and its shape info.

    `info` describes the data for model factories: `num_features` and `input_shape` (per-sample
    input shape) for feature data, `num_classes` for classification, `num_outputs` for
    regression, `vocab_size` and `seq_len` for language models. Missing keys are derived from
    the tensors. Tensors are converted on construction: inputs float32 (int64 token ids for
    language_model), targets int64 (float32 for regression and binary, whose targets are 0/1).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    task: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tasks.check_task(self.task)
        token_inputs = self.task == "language_model"
        x_dtype = torch.int64 if token_inputs else torch.float32
        y_dtype = torch.float32 if self.task in ("regression", "binary") else torch.int64
        self.train_x = torch.as_tensor(self.train_x).to(x_dtype).contiguous()
        self.test_x = torch.as_tensor(self.test_x).to(x_dtype).contiguous()
        self.train_y = torch.as_tensor(self.train_y).to(y_dtype).contiguous()
        self.test_y = torch.as_tensor(self.test_y).to(y_dtype).contiguous()
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dim() == 0 or len(x) == 0 or len(x) != len(y):
                raise ValueError(f"{split} split needs as many targets as inputs (at least one); "
                                 f"got x {tuple(x.shape)}, y {tuple(y.shape)}")
        self.info = {**_derived_info(self), **(self.info or {})}

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    def test_batches(self, batch_size: int) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """The test split in order, as (model inputs, targets) of at most batch_size samples."""
        for start in range(0, len(self.test_x), batch_size):
            yield (self.test_x[start : start + batch_size],), self.test_y[start : start + batch_size]


def _derived_info(data: Dataset) -> dict[str, Any]:
    shape = tuple(data.train_x.shape[1:])
    if data.task == "language_model":
        top = int(max(data.train_x.max(), data.train_y.max(), data.test_x.max(), data.test_y.max()))
        return {"vocab_size": top + 1, "seq_len": shape[0] if shape else 1}
    info: dict[str, Any] = {"num_features": math.prod(shape), "input_shape": shape}
    if data.task == "classification":
        info["num_classes"] = int(max(data.train_y.max(), data.test_y.max())) + 1
    else:
        info["num_outputs"] = math.prod(data.train_y.shape[1:])
    return info


def digits(seed: int, test_fraction: float = 0.2) -> Dataset:
    """sklearn's 8x8 handwritten digits (1797 images, bundled with sklearn), pixels in [0, 1].

    The split is stratified: each class puts round(test_fraction * its count) samples, chosen
    by a torch generator seeded with `seed`, into the test split.
    """
    pixels, labels = _digits_arrays()
    x = torch.as_tensor(pixels, dtype=torch.float32) / 16.0
    y = torch.as_tensor(labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    test_idx = []
    for label in range(10):
        members = torch.nonzero(y == label).flatten()
        chosen = members[torch.randperm(len(members), generator=gen)]
        test_idx.append(chosen[: round(test_fraction * len(members))])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test_idx)] = True
    return Dataset(x[~is_test], y[~is_test], x[is_test], y[is_test], "classification",
                   {"input_shape": (1, 8, 8), "num_classes": 10})


def _digits_arrays() -> tuple[Any, Any]:
    """(pixels float64 (1797, 64), labels int) of the digits, as sklearn.datasets.load_digits
    returns them, read from the CSV sklearn ships without importing sklearn (that import costs
    ~1 s of CPU in every worker); sklearn's own loader when the file is not where we look."""
    found = digits_csv()
    if found is None:
        from sklearn.datasets import load_digits  # a sklearn that keeps the data elsewhere

        raw = load_digits()
        return raw.data, raw.target
    import numpy as np  # torch's own dependency; imported here like sklearn's loader does

    with gzip.open(found, mode="rt", encoding="utf-8") as text:
        table = np.loadtxt(text, delimiter=",")  # as sklearn.datasets.load_digits parses it
    return table[:, :-1], table[:, -1].astype(int, copy=False)


def digits_csv() -> Path | None:
    """sklearn's bundled digits.csv.gz, found without importing sklearn; None if absent."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def regression(seed: int, n_samples: int = 1000, n_features: int = 10, noise: float = 0.1,
               test_fraction: float = 0.2) -> Dataset:
    """y = x . w + b + noise * eps with x, w, b, eps standard normal from a generator seeded by
    `seed`; the last test_fraction of the samples are the test split."""
    if n_samples < 2 or n_features < 1 or noise < 0:
        raise ValueError("regression needs n_samples >= 2, n_features >= 1 and noise >= 0")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_features, generator=gen)
    b = torch.randn((), generator=gen)
    x = torch.randn(n_samples, n_features, generator=gen)
    y = x @ w + b + noise * torch.randn(n_samples, generator=gen)
    n_test = min(n_samples - 1, max(1, round(test_fraction * n_samples)))
    cut = n_samples - n_test
    return Dataset(x[:cut], y[:cut], x[cut:], y[cut:], "regression")


# Characters the text corpus keeps: printable ASCII, newline and tab (so the vocabulary does
# not depend on which non-ASCII characters happen to sit in the first files).
_TEXT_CHARS = frozenset("\n\t" + "".join(chr(c) for c in range(32, 127)))


def text(seed: int, max_chars: int = 100_000, seq_len: int = 64, stride: int = 0,
         test_fraction: float = 0.1) -> Dataset:
    """Character-level next-char prediction on the Python standard library's own sources.

    The corpus is the top-level `*.py` files of this interpreter's stdlib in sorted order,
    filtered to printable ASCII, cut at max_chars; so it depends on the Python version (a
    worker on another version builds a different vocabulary, which the layout check catches).
    The first 1 - test_fraction of the corpus trains, the rest tests. A sample is a window of
    seq_len characters; its target is the same window shifted by one. Windows start every
    `stride` characters (0 = seq_len, non-overlapping). The vocabulary is the sorted set of
    characters in the corpus; info["vocab"] holds it as a string. `seed` is unused (no
    randomness).
    """
    del seed
    if max_chars < 4 * (seq_len + 1) or seq_len < 1:
        raise ValueError(f"text needs seq_len >= 1 and max_chars >= 4 * (seq_len + 1), "
                         f"got seq_len {seq_len}, max_chars {max_chars}")
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        kept = "".join(c for c in path.read_text(encoding="utf-8", errors="replace")
                       if c in _TEXT_CHARS)
        parts.append(kept)
        size += len(kept)
        if size >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    vocab = "".join(sorted(set(corpus)))
    lookup = torch.zeros(128, dtype=torch.int64)
    lookup[torch.tensor([ord(c) for c in vocab])] = torch.arange(len(vocab))
    ids = lookup[torch.frombuffer(bytearray(corpus.encode("ascii")), dtype=torch.uint8).long()]
    cut = round(len(ids) * (1 - test_fraction))
    step = stride or seq_len
    train = ids[:cut].unfold(0, seq_len + 1, step)
    test = ids[cut:].unfold(0, seq_len + 1, step)
    if len(train) == 0 or len(test) == 0:
        raise ValueError("text: corpus too small for one train and one test window; "
                         "raise max_chars or test_fraction")
    return Dataset(train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:], "language_model",
                   {"vocab_size": len(vocab), "seq_len": seq_len, "vocab": vocab})


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "regression": regression,
    "text": text,
}
# "files" (shard files on disk) is loaded by worker/filedataset.py, streamed, not built here.
assert (*DATASETS, "files") == spec_lib.BUILTIN_DATASETS


def load_dataset(name: str, kwargs: dict[str, Any] | None = None,
                 seed: int = 0) -> Dataset | torchdata.TorchData:
    """Loads a built-in dataset by name or a user's by `package.module:factory` import path.

    Built-ins are called as `builtin(seed, **kwargs)`; a user factory as `factory(**kwargs)`
    and must return a Dataset, a dict with Dataset's fields, or torch datasets: a
    `worker.torchdata.TorchData` or a tuple (train, test) of `torch.utils.data` datasets. Raises ValueError (or the
    factory's own exception) when the dataset cannot be built; the trainer reports it as the
    job's failure.
    """
    kwargs = dict(kwargs or {})
    if name in DATASETS:
        try:
            return DATASETS[name](seed, **kwargs)
        except TypeError as exc:  # an unknown kwarg: say which dataset rejected it
            raise ValueError(f"dataset {name!r}: {exc}") from None
    made = plugins.import_factory(name)(**kwargs)
    if (torch_data := torchdata.from_factory(made)) is not None:
        return torch_data
    if isinstance(made, dict):
        made = Dataset(**made)
    if not isinstance(made, Dataset):
        raise ValueError(f"dataset factory {name!r} returned {type(made).__name__}, "
                         "expected shardps.worker.datasets.Dataset, a dict of its fields, "
                         "shardps.worker.torchdata.TorchData or a tuple (train, test) of torch datasets")
    return made
