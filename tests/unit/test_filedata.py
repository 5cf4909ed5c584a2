"""File-backed batches: the documented order, assignment over live ranks, bounded read-ahead, bad files."""

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from shardps.proto import records
from shardps.worker.filedata import CtrBatch, FileBatchStream, ReadStats
from shardps.worker.fileorder import assign_files, block_order, epoch_order, list_files


def make_rows(start, count):
    """Records whose every field encodes the global row number, so order is visible."""
    rows = np.zeros(count, dtype=records.CTR_RECORD)
    ids = np.arange(start, start + count)
    rows["label"] = ids % 2
    rows["dense"] = ids[:, None]
    rows["cat"] = ids[:, None] * 1000 + np.arange(records.CATEGORICAL_FEATURES)
    return rows


def make_files(directory, sizes):
    directory.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for i, n in enumerate(sizes):
        writer = records.RecordFileWriter(directory / f"part-{i:05d}.npy", records.CTR_RECORD, n)
        writer.write(make_rows(start, n))
        writer.close()
        paths.append(str(directory / f"part-{i:05d}.npy"))
        start += n
    return paths


def row_ids(batches):
    return [int(v) for b in batches for v in b.dense[:, 0].tolist()]


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def documented_order(files, ranks, rank, epoch, seed, batch, shuffle):
    """The order rule of docs/data.md, written out independently of fileorder."""
    ordered = sorted(files, key=lambda f: (sha(f"{seed}:{epoch}:{os.path.basename(f)}"), os.path.basename(f)))
    ranks = sorted(ranks)
    mine = [f for i, f in enumerate(ordered) if ranks[i % len(ranks)] == rank]
    ids = []
    for f in mine:
        data = np.load(f)
        blocks = list(range((len(data) + batch - 1) // batch))
        if shuffle:
            blocks.sort(key=lambda j, f=f: sha(f"{seed}:{epoch}:{os.path.basename(f)}:{j}"))
        for j in blocks:
            ids += data["dense"][j * batch:(j + 1) * batch, 0].tolist()
    return ids


@pytest.mark.parametrize("ranks", [[0], [0, 1, 2], [0, 2, 5], list(range(11))])
@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_assignment_is_deterministic_disjoint_and_complete(ranks, epoch):
    files = [f"/data/part-{i:05d}.npy" for i in range(10)]
    a = assign_files(files, ranks, epoch, seed=3)
    assert a == assign_files(list(reversed(files)), reversed(ranks), epoch, seed=3)  # input order is irrelevant
    assert sorted(a) == sorted(ranks)
    got = [f for fs in a.values() for f in fs]
    assert sorted(got) == sorted(files)  # every file exactly once
    sizes = [len(fs) for fs in a.values()]
    assert max(sizes) - min(sizes) <= 1


def test_assignment_changes_by_epoch_keys_by_base_name_and_follows_live_ranks():
    files = [f"/data/part-{i:05d}.npy" for i in range(12)]
    by_epoch = [assign_files(files, [0, 1, 2], e, seed=1) for e in range(4)]
    assert len({str(a) for a in by_epoch}) == 4
    moved = assign_files([f.replace("/data/", "/mnt/other/") for f in files], [0, 1, 2], 2, seed=1)
    assert {r: [os.path.basename(f) for f in fs] for r, fs in moved.items()} == \
        {r: [os.path.basename(f) for f in fs] for r, fs in by_epoch[2].items()}
    assert assign_files(files, [0, 1, 2], 2, seed=2) != by_epoch[2]
    # Rank 1 leaves before epoch 3: the survivors share all files, none twice.
    after = assign_files(files, [0, 2], 3, seed=1)
    assert sorted(after) == [0, 2] and sorted(after[0] + after[2]) == sorted(files)


@pytest.mark.parametrize("files, ranks, match", [
    (["a/x.npy", "b/x.npy"], [0], "distinct base names"),
    (["a.npy"], [], "at least one live rank"),
    (["a.npy"], [-1, 0], ">= 0"),
])
def test_assignment_rejects_bad_input(files, ranks, match):
    with pytest.raises(ValueError, match=match):
        assign_files(files, ranks, 0, 0)


def test_block_order_covers_each_row_once():
    for shuffle in (False, True):
        blocks = block_order("part-1.npy", 103, 10, epoch=2, seed=4, shuffle=shuffle)
        assert sorted(blocks) == [(s, min(10, 103 - s)) for s in range(0, 103, 10)]
    assert block_order("p.npy", 103, 10, 2, 4, True) != block_order("p.npy", 103, 10, 3, 4, True)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_a_single_process_replays_every_ranks_stream(tmp_path, shuffle, drop_last):
    files = make_files(tmp_path, [37, 50, 8, 64, 21, 43, 29])
    ranks, seed, epoch, batch = [0, 1, 3], 9, 2, 16
    seen = []
    for rank, mine in assign_files(files, ranks, epoch, seed).items():
        with FileBatchStream(mine, batch, epoch=epoch, seed=seed, shuffle=shuffle, drop_last=drop_last,
                             prefetch=2) as stream:
            batches = list(stream)
        expected = documented_order(files, ranks, rank, epoch, seed, batch, shuffle)
        if drop_last:
            expected = expected[:len(expected) // batch * batch]
        assert row_ids(batches) == expected
        assert all(len(b.label) == batch for b in batches[:-1]) and 0 < len(batches[-1].label) <= batch
        seen += row_ids(batches)
    if not drop_last:
        assert sorted(seen) == list(range(252))  # the epoch reads every row exactly once


def test_batches_carry_the_rows_typed():
    rows = make_rows(40, 3)
    batch = CtrBatch.from_records(rows)
    assert batch.dense.dtype == torch.float32 and batch.dense.shape == (3, records.DENSE_FEATURES)
    assert batch.cat.dtype == torch.int64 and batch.cat.shape == (3, records.CATEGORICAL_FEATURES)
    assert batch.label.tolist() == [0.0, 1.0, 0.0]
    assert batch.cat[2, 5] == 42 * 1000 + 5


def wait_for(condition, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_read_ahead_is_bounded_and_only_own_files_are_opened(tmp_path):
    files = make_files(tmp_path, [400] * 6)  # 150 batches of 16, the queue holds 3
    mine = assign_files(files, [0, 1], epoch=0, seed=0)[1]
    stats = ReadStats()
    stream = FileBatchStream(mine, 16, prefetch=3, stats=stats)
    taken = 0
    for _ in range(200):
        # Let the reader run as far ahead as it can before each take.
        wait_for(lambda: stream.ahead >= 3 or not stream._thread.is_alive())
        assert stream.ahead <= 4  # prefetch queued + one handed over as the consumer takes
        if next(stream, None) is None:
            break
        taken += 1
    assert taken == 3 * 400 // 16
    assert 3 <= stream.max_ahead <= 4
    assert stats.files_opened == mine
    assert stats.rows_read == 1200 and stats.bytes_read == 1200 * records.CTR_RECORD.itemsize
    wait_for(lambda: not stream._thread.is_alive())


def test_close_mid_epoch_stops_the_reader(tmp_path):
    files = make_files(tmp_path, [1000] * 4)
    stream = FileBatchStream(files, 8, prefetch=2)
    assert len(next(stream).label) == 8
    stream.close()
    assert not stream._thread.is_alive()
    assert next(stream, None) is None


def test_a_consumer_that_walks_away_releases_the_reader(tmp_path):
    files = make_files(tmp_path, [1000])
    stream = FileBatchStream(files, 8, prefetch=2, timeout_s=0.5)
    next(stream)
    wait_for(lambda: not stream._thread.is_alive())  # gave up handing over after timeout_s


def corrupt_files(tmp_path):
    good = make_files(tmp_path / "good", [10, 10])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.npy").write_bytes(b"this is not an array" * 10)
    np.save(bad / "floats.npy", np.zeros((10, 3), dtype=np.float32))
    np.save(bad / "other.npy", np.zeros(10, dtype=[("label", "u1"), ("dense", "<i4", (13,))]))
    truncated = make_files(bad / "t", [10])[0]
    size = os.path.getsize(truncated)
    with open(truncated, "r+b") as f:
        f.truncate(size - 5)
    (bad / "adir.npy").mkdir()
    return good, {
        str(bad / "missing.npy"): "no such file",
        str(bad / "garbage.npy"): "not a NumPy .npy file",
        str(bad / "floats.npy"): "schema mismatch",
        str(bad / "other.npy"): "schema mismatch",
        truncated: f"corrupt: {size - 5} bytes on disk, the header promises {size}",
        str(bad / "adir.npy"): "is a directory",
    }


def test_a_bad_file_fails_the_stream_naming_the_file(tmp_path):
    good, bad = corrupt_files(tmp_path)
    for path, problem in bad.items():
        stream = FileBatchStream([good[0], path, good[1]], 4)
        with pytest.raises(records.DataFileError) as caught:
            next(stream)  # headers are checked before the first batch
        assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value)
        assert caught.value.path == path
        assert next(stream, None) is None and not stream._thread.is_alive()


def test_skip_bad_leaves_bad_files_out_and_says_which(tmp_path):
    good, bad = corrupt_files(tmp_path)
    stats = ReadStats()
    with FileBatchStream([good[0], *bad, good[1]], 4, skip_bad=True, stats=stats) as stream:
        assert row_ids(stream) == list(range(20))
    assert [s.split(": ")[0] for s in stats.skipped] == list(bad)
    assert stats.files_opened == good


def test_a_file_cut_short_while_reading_names_the_file(tmp_path):
    path = make_files(tmp_path, [10])[0]
    header = records.inspect(path, records.CTR_RECORD)
    with open(path, "r+b") as f:
        f.truncate(header.offset + 3 * records.CTR_RECORD.itemsize + 7)
    with open(path, "rb") as f:
        assert len(records.read_rows(f, header, 0, 3)) == 3
        with pytest.raises(records.DataFileError, match=f"^{path}: corrupt: file ended inside row 3"):
            records.read_rows(f, header, 2, 4)


def test_list_files_reads_a_directory_a_glob_or_a_list(tmp_path):
    files = make_files(tmp_path, [1, 1, 1])
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "part-00009.npy.tmp").write_text("")
    assert list_files(tmp_path) == files
    assert list_files(str(tmp_path / "part-0000[02].npy")) == [files[0], files[2]]
    assert list_files(files[::-1]) == files[::-1]
    with pytest.raises(ValueError, match="nothing-here.*: no data files"):
        list_files(str(tmp_path / "nothing-here*.npy"))
    assert epoch_order(files, 0, 0) == epoch_order(files[::-1], 0, 0)


def test_reader_memory_stays_bounded_on_a_file_many_times_larger(tmp_path):
    """A child reads a 256 MiB file in 1 MiB batches; its peak RSS grows by far less than the file."""
    path = tmp_path / "big.npy"
    chunk = make_rows(0, 4096)
    rows = 256 * 2**20 // records.CTR_RECORD.itemsize // 4096 * 4096
    writer = records.RecordFileWriter(path, records.CTR_RECORD, rows)
    for _ in range(rows // 4096):
        writer.write(chunk)
    writer.close()
    code = textwrap.dedent(f"""
        import resource
        from shardps.worker.filedata import FileBatchStream
        stream = FileBatchStream([{str(path)!r}], 4096, prefetch=4)
        n = len(next(stream).label)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for batch in stream:
            n += len(batch.label)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(n, before / 1024, after / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True)
    n, before, after = done.stdout.split()
    assert int(n) == rows
    file_mib = os.path.getsize(path) / 2**20
    assert float(after) - float(before) < 24, f"peak RSS {before} -> {after} MiB reading {file_mib:.0f} MiB"


def test_workers_read_a_generated_click_log_whole(tmp_path):
    from shardps.client import ctrdata

    summary = ctrdata.write_ctr(tmp_path / "log", 3000, 5, seed=4)
    files = list_files(tmp_path / "log")
    assert [os.path.basename(f) for f in files] == summary.files
    labels, ids = [], []
    for mine in assign_files(files, [0, 1], epoch=1, seed=4).values():
        with FileBatchStream(mine, 128, epoch=1, seed=4, shuffle=True) as stream:
            for batch in stream:
                labels.append(batch.label)
                ids.append(batch.cat)
    whole = np.concatenate([np.load(f) for f in files])
    assert torch.cat(labels).mean().item() == pytest.approx(summary.positive_rate)
    assert sorted(torch.cat(ids)[:, 25].tolist()) == sorted(whole["cat"][:, 25].tolist())
