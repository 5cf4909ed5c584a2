"""Batch sources: a file dataset's steps follow the documented order across epochs, any step can
be taken again (rewinds), each rank opens only its own files, and bad files name themselves."""

import json
import os

import numpy as np
import pytest
import torch

from shardps.proto import records
from shardps.proto import spec as spec_lib
from shardps.worker import batchsource, filedataset
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from shardps.worker.filedata import ReadStats
from shardps.worker.fileorder import assign_files
from shardps.worker.fileplan import Place
from tests.filereplay import rank_batches
from tests.unit.test_filedata import make_files, row_ids


def write_manifest(directory, paths):
    files = [{"name": os.path.basename(p), "rows": int(np.load(p, mmap_mode="r").shape[0])} for p in paths]
    (directory / records.MANIFEST).write_text(json.dumps({
        "format": records.MANIFEST_FORMAT, "schema": records.describe(records.CTR_RECORD), "files": files}))


def files_spec(path, **changes):
    raw = {"model": {"name": "dlrm"}, "stop": {"max_steps": 1},
           "data": {"dataset": "files", "files": {"path": str(path), **changes}}}
    return spec_lib.validate(raw)["data"]


@pytest.fixture
def log(tmp_path):
    """Seven files of uneven sizes (the last, by name, is held out) with a manifest."""
    paths = make_files(tmp_path / "log", [23, 40, 7, 31, 0, 18, 12])
    write_manifest(tmp_path / "log", paths)
    return tmp_path / "log", paths


def test_a_directory_with_a_manifest_trains_on_all_but_the_held_out_file(log):
    directory, paths = log
    data = batchsource.load_data(files_spec(directory), seed=0)
    assert data.from_manifest and data.task == "binary"
    assert data.train_files == tuple(paths[:-1]) and data.test_files == (paths[-1],)
    assert data.num_train == 23 + 40 + 7 + 31 + 0 + 18
    assert data.info == {"num_dense": 13, "num_categorical": 26, "num_outputs": 1}
    # The test split, in order, as (dense, cat) inputs and labels.
    batches = list(data.test_batches(5))
    assert [len(t) for _, t in batches] == [5, 5, 2]
    assert torch.cat([x[0][:, 0] for x, _ in batches]).tolist() == list(range(119, 131))


def test_a_glob_without_manifest_and_named_test_files(log, tmp_path):
    directory, paths = log
    os.remove(directory / records.MANIFEST)
    data = batchsource.load_data(files_spec(f"{directory}/part-0000[0-3].npy", test=paths[5]), seed=0)
    assert not data.from_manifest
    assert data.train_files == tuple(paths[:4]) and data.test_files == (paths[5],)
    assert data.rows[paths[5]] == 18 and data.num_train == 101


def replay(data, rank, world, global_batch, seed, shuffle, epochs):
    """Rank's batches (as row ids; [] for an empty step) replayed as docs/data.md says."""
    return [row_ids([b]) if b is not None else []
            for b in rank_batches(data, rank, world, global_batch, seed, epochs, shuffle)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_steps_run_through_the_epochs_and_can_be_taken_again(log, shuffle):
    directory, _ = log
    data = batchsource.load_data(files_spec(directory), seed=0)
    world, global_batch, seed = 3, 20, 5  # 119 rows: 6 steps an epoch
    per_epoch = []
    for rank in range(world):
        stats = ReadStats()
        source = batchsource.FileSource(data, global_batch, shuffle, seed, stats)
        assert source.steps_per_epoch == 6
        expected = replay(data, rank, world, global_batch, seed, shuffle, epochs=4)
        steps = len(expected)
        got = [row_ids_of(source.take(t, rank, world)) for t in range(steps)]
        assert got == expected
        # A rewind and a jump: the same step gives the same rows.
        for t in (3, steps - 1, 0, steps // 2):
            assert row_ids_of(source.take(t, rank, world)) == expected[t]
        source.close()
        own = {f for e in range(5) for f in assign_files(data.train_files, range(world), e, seed)[rank]}
        assert set(stats.files_opened) <= own
        per_epoch.append([sorted(sum(expected[e * 6:(e + 1) * 6], [])) for e in range(4)])
    # Every epoch reads every train row once, across the ranks.
    for epoch in range(4):
        assert sorted(sum((p[epoch] for p in per_epoch), [])) == list(range(data.num_train))


def row_ids_of(batch):
    dense, cat = batch.inputs
    assert dense.shape[1:] == (13,) and cat.shape[1:] == (26,) and cat.dtype == torch.int64
    assert torch.equal(batch.target, (dense[:, 0] % 2))
    return [int(v) for v in dense[:, 0].tolist()]


def test_a_jump_into_an_epoch_reads_nothing_before_it(log):
    directory, _ = log
    data = batchsource.load_data(files_spec(directory), seed=0)
    stats = ReadStats()
    source = batchsource.FileSource(data, 4, False, 0, stats)
    steps = source.steps_per_epoch
    assert steps == -(-data.num_train // 4) and source.plan(Place(0, 1), 0).batch_size == 4
    source.take(0, 0, 1)  # its first step: epoch 0 is read with rank 0 of 1
    source.close()
    stats.files_opened.clear()
    stats.rows_read = 0
    first = source.take(steps - 1, 0, 1)  # the last batch of epoch 0
    assert len(first) == data.num_train - 4 * (steps - 1)
    assert stats.rows_read == len(first) and len(stats.files_opened) == 1
    source.close()


def test_ranks_without_files_take_empty_batches(log):
    directory, _ = log
    data = batchsource.load_data(files_spec(directory), seed=0)
    world = len(data.train_files) + 2  # more ranks than files
    for rank in range(world):
        source = batchsource.FileSource(data, 2, False, 0)
        rows = sum(data.rows[f] for f in assign_files(data.train_files, range(world), 0, 0)[rank])
        assert len(source.take(0, rank, world)) == min(rows, -(-rows // source.steps_per_epoch))
        source.close()


def test_memory_source_is_the_batch_orders_slice():
    data = load_dataset("regression", {"n_samples": 50}, seed=1)
    source = batchsource.open_source(data, {"batch_size": 16, "shuffle": True}, seed=2)
    order = BatchOrder(data.num_train, 16, True, 2)
    batch = source.take(7, 1, 3)
    index = order.slice(7, 1, 3)
    assert torch.equal(batch.inputs[0], data.train_x[index]) and torch.equal(batch.target, data.train_y[index])


def test_a_missing_file_listed_by_the_manifest_is_named_when_its_rank_reads(log):
    directory, paths = log
    os.remove(paths[1])
    data = batchsource.load_data(files_spec(directory), seed=0)  # the manifest still lists it
    source = batchsource.FileSource(data, 8, False, 0)
    with pytest.raises(records.DataFileError, match=f"^{paths[1]}: no such file"):
        source.take(0, 0, 1)
    source.close()
    # skip_bad leaves it out and notes why.
    data = batchsource.load_data(files_spec(directory, skip_bad=True), seed=0)
    stats = ReadStats()
    source = batchsource.FileSource(data, 8, False, 0, stats)
    assert len(source.take(0, 0, 1)) == 8 and stats.skipped == [f"{paths[1]}: no such file"]
    source.close()


def test_a_file_that_changed_since_the_manifest_is_named(log):
    directory, paths = log
    make_files(directory / "other", [5])
    os.replace(directory / "other" / "part-00000.npy", paths[3])
    data = batchsource.load_data(files_spec(directory), seed=0)
    source = batchsource.FileSource(data, 8, False, 0)
    with pytest.raises(records.DataFileError, match=f"^{paths[3]}: holds 5 rows, the manifest says 31"):
        for t in range(20):
            source.take(t, 0, 1)
    source.close()


@pytest.mark.parametrize("change, message", [
    (lambda m: {**m, "format": "other/1"}, "format 'other/1', expected 'shardps.records/1'"),
    (lambda m: {**m, "schema": m["schema"][:2]}, "schema mismatch"),
    (lambda m: {**m, "files": [{"name": "../x.npy", "rows": 1}]}, "files: expected base names"),
    (lambda m: {**m, "files": 3}, "files: expected a list of {name, rows}"),
])
def test_a_bad_manifest_is_named(log, change, message):
    directory, _ = log
    path = directory / records.MANIFEST
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(records.DataFileError, match=f"^{path}: ") as info:
        batchsource.load_data(files_spec(directory), seed=0)
    assert message in str(info.value)


def test_bad_paths_and_holdouts_are_named(log, tmp_path):
    directory, paths = log
    with pytest.raises(records.DataFileError, match="nowhere: no such file or directory"):
        batchsource.load_data(files_spec(tmp_path / "nowhere"), seed=0)
    with pytest.raises(ValueError, match="data.files.holdout: holding out 7 of the 7 files"):
        batchsource.load_data(files_spec(directory, holdout=7), seed=0)
    with pytest.raises(ValueError, match="data.files.test: files both train and test"):
        batchsource.load_data(files_spec(directory, test=paths[0]), seed=0)
    # Without a manifest every header is checked at load: a wrong schema names its file.
    os.remove(directory / records.MANIFEST)
    np.save(paths[2], np.zeros(3, dtype=[("label", "u1")]))
    with pytest.raises(records.DataFileError, match=f"^{paths[2]}: schema mismatch"):
        filedataset.load(files_spec(directory)["files"])


def test_read_stats_keep_the_newest_paths_only(monkeypatch):
    seen = []
    stats = ReadStats(on_open=seen.append)
    monkeypatch.setattr(ReadStats, "MAX_KEPT", 3)
    for i in range(5):
        stats.opened(f"f{i}")
    assert stats.files_opened == ["f2", "f3", "f4"] and seen == [f"f{i}" for i in range(5)]
