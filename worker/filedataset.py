"""A job's file-backed dataset (`data: {dataset: files, files: {...}}`): which files train and
which test, their rows, and the test split streamed for evaluation.

Loading reads the directory's manifest (or, without one, each file's header), never the rows:
every worker knows every file's row count, so it can place any step in its own files without
opening anyone else's (`worker/batchsource.py`). `docs/data.md` describes the spec section.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shardps.proto import records
from shardps.worker import fileorder
from shardps.worker.filedata import FileBatchStream, ReadStats

# The record schema of each data.files.format (spec.FILE_FORMATS).
FORMATS: dict[str, np.dtype] = {"ctr": records.CTR_RECORD}
CTR_INFO = {"num_dense": records.DENSE_FEATURES, "num_categorical": records.CATEGORICAL_FEATURES,
            "num_outputs": 1}


@dataclass(frozen=True)
class FileDataset:
    """Train and test files of one job and the rows of each, as every rank loads them.

    `rows` maps each train and test file's path to its row count (from the manifest, or the
    file's header). Threading: immutable; `test_batches` starts a reader thread per call.
    """

    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    rows: Mapping[str, int]
    dtype: np.dtype
    from_manifest: bool
    prefetch: int = 4
    skip_bad: bool = False
    task: str = "binary"
    info: dict[str, Any] = field(default_factory=lambda: dict(CTR_INFO))
    eval_stats: ReadStats = field(default_factory=ReadStats, compare=False)

    @property
    def num_train(self) -> int:
        return sum(self.rows[f] for f in self.train_files)

    def test_batches(self, batch_size: int) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """The test files in the order given, unshuffled, as ((dense, cat), label) batches."""
        with FileBatchStream(self.test_files, batch_size, prefetch=self.prefetch, skip_bad=self.skip_bad,
                             stats=self.eval_stats) as stream:
            for batch in stream:
                yield (batch.dense, batch.cat), batch.label


def load(files_spec: Mapping[str, Any]) -> FileDataset:
    """The dataset a spec's `data.files` section names; DataFileError naming the file, or
    ValueError naming the key, when it cannot be used.

    `path` (and `test`) is a directory, whose `manifest.json` lists the files when it has one
    (else its `*.npy` files), a glob, or one file. Relative paths are taken from the worker's working
    directory. With `test` empty, the last `holdout` train files in name order are the test set.
    """
    dtype = FORMATS[files_spec["format"]]
    train, rows, from_manifest = _files(files_spec["path"], dtype, files_spec["skip_bad"])
    if files_spec["test"]:
        test, test_rows, _ = _files(files_spec["test"], dtype, files_spec["skip_bad"])
        rows = {**rows, **test_rows}
    else:
        by_name = sorted(train, key=os.path.basename)
        holdout = files_spec["holdout"]
        if holdout >= len(by_name):
            raise ValueError(f"data.files.holdout: holding out {holdout} of the {len(by_name)} files in "
                             f"{files_spec['path']} leaves none to train on")
        test = by_name[len(by_name) - holdout:]
        train = [f for f in train if f not in test]
    overlap = sorted({os.path.basename(f) for f in train} & {os.path.basename(f) for f in test})
    if overlap:
        raise ValueError(f"data.files.test: files both train and test: {overlap[:5]}")
    return FileDataset(tuple(train), tuple(test), rows, dtype, from_manifest, files_spec["prefetch"],
                       files_spec["skip_bad"])


def _files(source: str, dtype: np.dtype, skip_bad: bool) -> tuple[list[str], dict[str, int], bool]:
    """(files, rows of each, whether a manifest said so) for one path or glob."""
    manifest = os.path.join(source, records.MANIFEST)
    if os.path.isdir(source) and os.path.exists(manifest):
        files, rows = read_manifest(manifest, dtype)
        return files, rows, True
    if not os.path.exists(source) and not any(ch in source for ch in "*?["):
        raise records.DataFileError(source, "no such file or directory")
    files = fileorder.list_files(source)
    found: dict[str, int] = {}
    for path in files:  # the headers only: every rank needs every file's rows
        try:
            found[path] = records.inspect(path, dtype).rows
        except records.DataFileError:
            if not skip_bad:
                raise
    return [f for f in files if f in found], found, False


def read_manifest(path: str, dtype: np.dtype) -> tuple[list[str], dict[str, int]]:
    """The files a manifest lists (joined to its directory) and their rows; DataFileError
    naming the manifest if it is unreadable or describes another format or schema."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise records.DataFileError(path, f"not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != records.MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise records.DataFileError(path, f"format {found!r}, expected {records.MANIFEST_FORMAT!r}")
    if manifest.get("schema") != records.describe(dtype):
        raise records.DataFileError(path, f"schema mismatch: fields {manifest.get('schema')}, expected "
                                          f"{records.describe(dtype)}")
    entries = manifest.get("files")
    try:
        listed = [(str(e["name"]), int(e["rows"])) for e in entries or ()]
    except (TypeError, KeyError, ValueError):
        raise records.DataFileError(path, "files: expected a list of {name, rows}") from None
    if not listed or any(os.path.basename(n) != n or r < 0 for n, r in listed):
        raise records.DataFileError(path, "files: expected base names with rows >= 0, at least one")
    folder = os.path.dirname(path)
    rows = {os.path.join(folder, n): r for n, r in listed}
    return list(rows), rows
