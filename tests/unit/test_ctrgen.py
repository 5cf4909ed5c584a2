"""The synthetic click log: deterministic, Zipf ids, streamed, and its Bayes AUC is an upper bound."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from shardps.client import ctrdata, ctrmodel
from shardps.proto import exitcodes, records
from shardps.worker.binmetrics import auc


def read_all(out):
    manifest = json.loads((out / ctrdata.MANIFEST).read_text())
    return np.concatenate([np.load(out / f["name"]) for f in manifest["files"]]), manifest


def test_the_log_is_a_function_of_seed_and_rows(tmp_path):
    rows = ctrmodel.BLOCK_ROWS + 1000  # two blocks, the second one short
    ctrdata.write_ctr(tmp_path / "a", rows, 3, seed=5)
    ctrdata.write_ctr(tmp_path / "b", rows, 3, seed=5)
    ctrdata.write_ctr(tmp_path / "c", rows, 1, seed=5)
    ctrdata.write_ctr(tmp_path / "d", rows, 3, seed=6)
    for name in ("part-00000.npy", "part-00001.npy", "part-00002.npy", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a, manifest = read_all(tmp_path / "a")
    c, _ = read_all(tmp_path / "c")
    d, _ = read_all(tmp_path / "d")
    assert a.tobytes() == c.tobytes()  # the same rows however they are split
    assert not np.array_equal(a["cat"], d["cat"])
    assert [f["rows"] for f in manifest["files"]] == ctrdata.file_rows(rows, 3) == [5794, 5795, 5795]
    assert manifest["rows"] == rows and manifest["seed"] == 5
    assert manifest["schema"] == records.describe(records.CTR_RECORD)
    assert set(np.unique(a["label"]).tolist()) == {0, 1}
    assert (a["dense"] >= 0).all()


def test_ids_are_zipf_per_feature_and_spread_over_int64():
    u = np.random.default_rng(0).random(200_000)
    for vocab, s in ((4, 1.1), (5000, 1.2), (4 << 20, 1.3)):
        ranks = ctrmodel.zipf_ranks(u, vocab, s).astype(np.int64)
        assert ranks.min() >= 0 and ranks.max() < vocab
        a = 1 - s
        for k in (0, 1, 2):  # P(rank <= k) of the power law on [1, vocab + 1)
            expected = ((k + 2) ** a - 1) / ((vocab + 1) ** a - 1)
            assert (ranks <= k).mean() == pytest.approx(expected, abs=0.005)
    block = ctrmodel.draw_block(seed=1, index=0, rows=ctrmodel.BLOCK_ROWS)
    distinct = [len(np.unique(block.records["cat"][:, f])) for f in range(records.CATEGORICAL_FEATURES)]
    assert distinct[0] == 4 and distinct[-1] > 1000  # small to large vocabularies
    ids = block.records["cat"][:, -1]
    assert ids.min() < -(2**62) and ids.max() > 2**62


def test_histogram_auc_is_within_its_bound_of_the_exact_auc():
    block = ctrmodel.draw_block(seed=2, index=0, rows=5000)
    label = block.records["label"].astype(bool)
    exact = auc(torch.from_numpy(block.probability), torch.from_numpy(label))
    for bins in (1 << 20, 64):
        h = ctrdata.HistogramAuc(bins)
        h.add(block.probability[:2000], label[:2000])
        h.add(block.probability[2000:], label[2000:])
        assert abs(h.auc() - exact) <= h.error_bound() + 1e-12
    coarse = ctrdata.HistogramAuc(4)
    coarse.add(block.probability, label)
    assert coarse.error_bound() > 0.01  # a coarse histogram admits it is coarse
    with pytest.raises(ValueError, match="both classes"):
        ctrdata.HistogramAuc(8).error_bound()


def logistic_regression_auc(train, test, steps=300, buckets=1024, lr=0.01):
    """Logistic regression on hashed one-hot ids (`buckets` per feature) and log1p(dense), by Adam."""
    offsets = torch.arange(records.CATEGORICAL_FEATURES) * buckets

    def features(rows):
        cat = torch.from_numpy(rows["cat"] % buckets) + offsets
        return cat, torch.log1p(torch.from_numpy(rows["dense"].astype(np.float32)))

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(records.CATEGORICAL_FEATURES * buckets))
    dense = torch.nn.Linear(records.DENSE_FEATURES, 1)
    opt = torch.optim.Adam([weight, *dense.parameters()], lr=lr)
    cat, x = features(train)
    y = torch.from_numpy(train["label"].astype(np.float32))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(y), (1024,), generator=g)
        logit = weight[cat[i]].sum(1) + dense(x[i]).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cat, x = features(test)
    with torch.no_grad():
        scores = weight[cat].sum(1) + dense(x).squeeze(1)
    return auc(scores, torch.from_numpy(test["label"]))


def test_bayes_auc_bounds_a_trained_logistic_regression(tmp_path, capsys):
    rows = 4 * ctrmodel.BLOCK_ROWS
    assert ctrdata.main(["ctr", str(tmp_path / "log"), "--rows", str(rows), "--files", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    log, manifest = read_all(tmp_path / "log")
    assert f"Bayes AUC {manifest['bayes_auc']:.5f}" in printed
    test_rows = ctrmodel.BLOCK_ROWS  # the last block is held out
    learned = logistic_regression_auc(log[:-test_rows], log[-test_rows:])
    truth = ctrmodel.draw_block(seed=3, index=3, rows=test_rows)
    assert truth.records.tobytes() == log[-test_rows:].tobytes()
    bayes_on_test = auc(torch.from_numpy(truth.probability), torch.from_numpy(log[-test_rows:]["label"]))
    assert 0.63 < learned < bayes_on_test  # it learns something, and not more than the truth allows
    assert learned < manifest["bayes_auc"]
    assert abs(manifest["bayes_auc"] - bayes_on_test) < 0.02  # the printed figure describes the log


@pytest.mark.parametrize("argv, match", [
    (["--rows", "10", "--files", "11"], "every file needs a row"),
    (["--rows", "0", "--files", "1"], "must be >= 1"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, match):
    assert ctrdata.main(["ctr", str(tmp_path / "x"), *argv]) == exitcodes.USAGE
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_log_of_one_class_has_no_bayes_auc(tmp_path, capsys):
    assert ctrdata.main(["ctr", str(tmp_path / "tiny"), "--rows", "1", "--files", "1"]) == exitcodes.OK
    assert "Bayes AUC undefined: every label is the same" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "tiny" / ctrdata.MANIFEST).read_text())
    assert manifest["bayes_auc"] is None and manifest["rows"] == 1
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["manifest.json", "part-00000.npy"]


def test_cli_refuses_a_directory_with_files_and_changes_nothing(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert ctrdata.main(["ctr", str(tmp_path), "--rows", "10", "--files", "1"]) == exitcodes.USAGE
    assert f"{tmp_path} exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def peak_rss_mib(out, rows):
    code = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from shardps.client import ctrdata
        ctrdata.write_ctr(Path({str(out)!r}), {rows}, 4, seed=0)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True)
    return float(done.stdout.split()[-1])


def test_generator_memory_does_not_grow_with_the_log(tmp_path):
    small = peak_rss_mib(tmp_path / "small", ctrmodel.BLOCK_ROWS)
    big_rows = 40 * ctrmodel.BLOCK_ROWS  # 171 MB of records
    big = peak_rss_mib(tmp_path / "big", big_rows)
    log_mib = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.npy")) / 2**20
    assert log_mib > 160
    assert big - small < 32, f"peak RSS {small:.0f} MiB for one block, {big:.0f} MiB for {log_mib:.0f} MiB of log"
