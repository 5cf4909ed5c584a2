"""Places of epochs as membership changes (worker/fileplan.py), and what FileSources read with
them: a death mid-epoch leaves the dead worker's unread files to the next epoch, a joiner waits
for the next epoch, and no file is read twice in an epoch."""

import pytest

from shardps.worker import batchsource
from shardps.worker.filedata import ReadStats
from shardps.worker.fileplan import EpochPlaces, Place, epoch_length
from tests.unit.test_batchsource import files_spec, write_manifest
from tests.unit.test_filedata import make_files


def test_epoch_length_is_one_pass_in_global_batches():
    assert epoch_length(100, 30) == 4 and epoch_length(90, 30) == 3 and epoch_length(0, 8) == 1
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        epoch_length(10, 0)


def test_a_change_takes_effect_at_the_next_epoch_and_rewinds_see_the_old_place():
    places = EpochPlaces()
    a, b = Place(1, 3), Place(1, 2)
    assert places.place(0, 0, a) == a and places.place(0, 5, a) == a
    assert places.place(1, 0, a) == a
    assert places.place(1, 4, b) == a  # the change arrives mid-epoch 1: epoch 1 keeps a
    assert places.place(2, 0, b) == b
    assert places.place(1, 2, b) == a and places.place(0, 0, b) == a  # a rewind: as it was
    assert places.place(4, 3, a) == a  # a jump over epoch 3: epochs 3 and 4 take the place now
    assert places.place(3, 0, b) == a
    assert places.fixed() == [(0, a), (2, b), (3, a)]


def test_a_worker_joining_mid_epoch_reads_from_the_next_epoch():
    places = EpochPlaces()
    p = Place(2, 3)
    assert places.place(5, 7, p) is None and places.place(5, 0, p) is None
    assert places.place(4, 0, p) is None  # before it joined
    assert places.place(6, 0, p) == p
    joined_at_a_start = EpochPlaces()
    assert joined_at_a_start.place(5, 0, p) == p and joined_at_a_start.place(4, 9, p) is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        EpochPlaces().place(-1, 0, Place(0, 1))


@pytest.fixture
def data(tmp_path):
    """12 files of 20 rows; global batch 24: 10 steps an epoch."""
    paths = make_files(tmp_path / "log", [20] * 13)
    write_manifest(tmp_path / "log", paths)
    return batchsource.load_data(files_spec(tmp_path / "log"), seed=0)


def run(data, timeline, steps, shuffle=True):
    """Runs workers through `steps` steps; timeline(worker, step) is its (rank, world) then, or
    None when it is not there. Returns {(worker, epoch): rows read}."""
    sources = {w: batchsource.FileSource(data, 24, shuffle, 3, ReadStats()) for w in "abcd"}
    rows: dict[tuple[str, int], list[int]] = {}
    for t in range(steps):
        for w, source in sources.items():
            place = timeline(w, t)
            if place is not None:
                batch = source.take(t, *place)
                rows.setdefault((w, t // 10), []).extend(int(v) for v in batch.inputs[0][:, 0].tolist())
    for source in sources.values():
        source.close()
    return rows


def check_no_row_twice_an_epoch(rows, epochs):
    for epoch in range(epochs):
        seen = [r for (w, e), got in rows.items() if e == epoch for r in got]
        assert len(seen) == len(set(seen)), epoch


def test_a_death_mid_epoch_leaves_its_files_to_the_next_epoch(data):
    # a, b, c are ranks 0, 1, 2 of 3; b dies at step 14 (epoch 1); c becomes rank 1 of 2.
    def timeline(w, t):
        if w == "d" or (w == "b" and t >= 14):
            return None
        if t < 14:
            return {"a": (0, 3), "b": (1, 3), "c": (2, 3)}[w]
        return {"a": (0, 2), "c": (1, 2)}[w]

    rows = run(data, timeline, 40)
    check_no_row_twice_an_epoch(rows, 4)
    everything = set(range(data.num_train))
    assert set(rows["a", 0] + rows["b", 0] + rows["c", 0]) == everything
    # Epoch 1: a and c read all of their own files; b read 4/10 of its own; the rest is lost to
    # this epoch.
    assert len(rows["a", 1]) == len(rows["c", 1]) == 80 and len(rows["b", 1]) == 32
    # Epochs 2 and 3: the two survivors read everything.
    for epoch in (2, 3):
        assert set(rows["a", epoch] + rows["c", epoch]) == everything


def test_a_joiner_waits_for_the_next_epoch(data):
    # a, b are ranks 0, 1 of 2; d joins at step 15 as rank 2 of 3.
    def timeline(w, t):
        if w in "ab":
            return ({"a": 0, "b": 1}[w], 2 if t < 15 else 3)
        return (2, 3) if w == "d" and t >= 15 else None

    rows = run(data, timeline, 40, shuffle=False)
    check_no_row_twice_an_epoch(rows, 4)
    everything = set(range(data.num_train))
    assert set(rows["a", 1] + rows["b", 1]) == everything and not rows.get(("d", 1))
    for epoch in (2, 3):
        assert set(rows["a", epoch] + rows["b", epoch] + rows["d", epoch]) == everything
        assert rows["d", epoch]


def test_only_the_newest_changes_are_kept(monkeypatch):
    monkeypatch.setattr(EpochPlaces, "MAX_CHANGES", 3)
    places = EpochPlaces()
    for epoch in range(10):  # a new world size every epoch
        assert places.place(epoch, 0, Place(0, 1 + epoch % 2)) == Place(0, 1 + epoch % 2)
    assert len(places.fixed()) == 3
    assert [places.place(e, 0, Place(0, 9)) for e in (7, 8, 9)] == [Place(0, 2), Place(0, 1), Place(0, 2)]
