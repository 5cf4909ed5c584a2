"""Embedding tables in shard checkpoints (server/ps/ckpt_tables.py): rows, optimizer state and
step counts round-trip exactly and training continues bitwise; the open sync round's row
gradients are not in a checkpoint and a rollback drops them; InitRows writes a new base
checkpoint and is refused once training started; a resumed job takes the old job's tables; a
torn or tampered table part is refused like a dense one, and the previous checkpoint is used;
a dynamic table's part (ids, last-touched steps, sketch) restores exactly and is validated."""

import hashlib
import struct
from dataclasses import replace

import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.proto import tables as tables_lib
from shardps.server.ps import checkpoint, ckpt_tables
from shardps.server.ps.checkpointer import Checkpointer
from shardps.server.ps.errors import InvalidConfigError
from shardps.server.ps.shard import Shard
from shardps.server.ps.table_config import TableConfig
from shardps.server.ps.table_optim import RowwiseAdagrad
from shardps.server.ps.table_shard import TableShard
from shardps.server.ps.tables import RowsAfterStartError
from tests import crashfork, tamper

ROWS, DIM, WORKERS = 50, 4, ("w0", "w1")


def config(mode=common_pb2.CONSISTENCY_SYNC, every=0, job_id="job"):
    """Dense length 10 and two fixed tables on one shard: "emb" (lazy Adam), "acc" (Adagrad)."""
    def table(name, optimizer):
        return ps_pb2.TableSpec(name=name, dim=DIM, num_embeddings=ROWS, num_shards=1,
                                optimizer=optimizer, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
    return ps_pb2.ShardConfig(
        job_id=job_id, shard_index=0, offset=0, length=10, total=10,
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8, schedule="constant"),
        mode=mode, workers=list(WORKERS), epoch=1, layout_fingerprint="fp",
        checkpoint_every_steps=every, checkpoint_keep=3,
        tables=[table("emb", "lazy_adam"), table("acc", "adagrad")])


def seeded(**kw) -> Shard:
    shard = Shard(config(**kw), torch.linspace(-1, 1, 10))
    for i, name in enumerate(("emb", "acc")):
        shard.rows.init(name, torch.arange(ROWS * DIM, dtype=torch.float32).view(ROWS, DIM)
                        / (100 + i))
    return shard


def row_grad(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.unique(torch.randint(0, ROWS, (6,), generator=gen))
    return ids, torch.randn(ids.numel(), DIM, generator=gen)


def push_step(shard: Shard, step: int, workers=WORKERS, dense=True) -> None:
    """Every worker's row gradients of both tables, then (dense) its dense push."""
    for i, worker in enumerate(workers):
        for t, name in enumerate(("emb", "acc")):
            ids, rows = row_grad(step * 100 + i * 10 + t)
            shard.rows.push(name, worker=worker, incarnation=1, step=step, ids=ids, grads=rows)
        if dense:
            grad = torch.randn(10, generator=torch.Generator().manual_seed(step * 10 + i))
            shard.push(grad, worker_id=worker, incarnation=1, step=step)


def held(shard: Shard) -> dict[str, torch.Tensor]:
    return {name: shard.rows.held(name) for name in ("emb", "acc")}


def assert_same(a: Shard, b: Shard) -> None:
    sa, sb = a.capture(), b.capture()
    assert (sa.version, sa.adam_step) == (sb.version, sb.adam_step)
    for name in sa.tensors:
        assert torch.equal(sa.tensors[name], sb.tensors[name]), name
    assert sa.tables.keys() == sb.tables.keys() == {"emb", "acc"}
    for name, ta in sa.tables.items():
        tb = sb.tables[name]
        assert ta.optimizer == tb.optimizer and ta.counters == tb.counters
        assert ta.tensors.keys() == tb.tensors.keys()
        for key in ta.tensors:
            assert torch.equal(ta.tensors[key], tb.tensors[key]), (name, key)


def test_tables_round_trip_exactly_and_training_continues_bitwise(tmp_path):
    straight, resumed = seeded(), seeded()
    for step in range(3):
        push_step(straight, step)
        push_step(resumed, step)
    path = checkpoint.write(tmp_path, resumed.capture(), keep=3)
    assert {p.name for p in path.iterdir()} >= {
        "table-0.weights.bin", "table-0.state.exp_avg.bin", "table-0.state.exp_avg_sq.bin",
        "table-1.weights.bin", "table-1.state.sum.bin"}
    state = checkpoint.load(tmp_path).state
    assert {n: t.optimizer["steps"] for n, t in state.tables.items()} == {"emb": 3, "acc": 3}
    restored = Shard.from_state(state)
    assert_same(restored, resumed)
    for step in range(3, 6):
        push_step(straight, step)
        push_step(restored, step)
    assert_same(restored, straight)
    assert not torch.equal(held(restored)["emb"], held(seeded())["emb"])  # it trained


def test_the_open_rounds_rows_are_not_checkpointed_and_a_rollback_drops_them(tmp_path):
    """Rows of the open round (step 2) are pushed again after a restore or a rollback; rows
    buffered from the abandoned timeline must not leak into the replayed round."""
    straight, shard = seeded(), seeded()
    for step in range(2):
        push_step(straight, step)
        push_step(shard, step)
    base = shard.capture()
    push_step(shard, 2, workers=("w0",), dense=False)  # rows of round 2 buffered
    state = shard.capture()
    assert state.version == 2
    assert all(torch.equal(state.tables[n].tensors["weights"], base.tables[n].tensors["weights"])
               for n in state.tables)
    push_step(shard, 2)  # round 2 closes
    push_step(shard, 3, workers=("w1",), dense=False)  # and round 3 buffers w1's rows
    shard.load_state(state)  # the rollback to version 2
    assert_same(shard, Shard.from_state(state))
    # Replayed: round 2, then round 3 where w1 pushes no rows this time.
    for s in (shard, straight):
        push_step(s, 2)
        push_step(s, 3, workers=("w0",))
        s.push(torch.ones(10), worker_id="w1", incarnation=1, step=3)
    assert_same(shard, straight)


def test_async_applied_rows_survive_a_restore_so_a_retry_is_a_duplicate(tmp_path):
    shard = seeded(mode=common_pb2.CONSISTENCY_ASYNC)
    ids, rows = row_grad(1)
    assert shard.rows.push("emb", worker="w0", incarnation=1, step=0, ids=ids,
                           grads=rows)[0] == ps_pb2.PUSH_STATUS_APPLIED
    checkpoint.write(tmp_path, shard.capture(), keep=3)
    restored = Shard.from_state(checkpoint.load(tmp_path).state)
    assert restored.rows.push("emb", worker="w0", incarnation=1, step=0, ids=ids,
                              grads=rows)[0] == ps_pb2.PUSH_STATUS_DUPLICATE
    assert torch.equal(held(restored)["emb"], held(shard)["emb"])
    assert restored.rows.stats("emb").steps == 1


def test_init_rows_writes_a_new_base_and_a_rollback_to_zero_finds_the_seeded_rows(tmp_path):
    cp = Checkpointer(tmp_path)
    shard = Shard(config(every=2), torch.linspace(-1, 1, 10))
    cp.attach(shard)
    rows = torch.rand(ROWS, DIM)
    shard.rows.init("emb", rows)
    shard.rows.init("acc", rows * 2)
    assert cp.writer.flush()  # (copies queued at once: a periodic one may be dropped)
    for step in range(4):
        push_step(shard, step)
    assert cp.writer.flush()
    directory = cp.data_dir.shard_dir("job", 0)
    # The InitShard base and one once both tables are seeded, both kept; then versions 2, 4.
    assert [v for v, _ in checkpoint.committed(directory)] == [4, 2, 0, 0]
    cp.recovery.rollback(shard, rollback_id=1, version=0)
    assert shard.version == 0
    assert torch.equal(held(shard)["emb"], rows) and torch.equal(held(shard)["acc"], rows * 2)
    assert shard.rows.stats("emb").steps == 0
    push_step(shard, 0)
    with pytest.raises(RowsAfterStartError, match="rows are set before the first step"):
        shard.rows.init("emb", rows)
    cp.shutdown()


def test_a_checkpoint_of_other_tables_is_refused_before_anything_changes(tmp_path):
    shard = seeded()
    push_step(shard, 0)
    other = ps_pb2.ShardConfig()
    other.CopyFrom(config())
    other.tables[1].name = "other"
    stranger = Shard(other, torch.zeros(10))
    before = shard.capture()
    with pytest.raises(InvalidConfigError, match="tables"):
        shard.load_state(stranger.capture())
    assert_same(shard, Shard.from_state(before))


def test_a_resumed_job_takes_the_old_jobs_tables_and_refuses_other_ones(tmp_path):
    cp = Checkpointer(tmp_path)
    old = Shard(config(job_id="old"), torch.linspace(-1, 1, 10))
    cp.attach(old)
    for name in ("emb", "acc"):
        old.rows.init(name, torch.rand(ROWS, DIM))
    for step in range(3):
        push_step(old, step)
    cp.checkpoint_now(old)
    resumed = config(job_id="new")
    resumed.resume_from_job, resumed.resume_version = "old", 3
    new = Shard(resumed, torch.zeros(10))
    cp.attach(new)
    assert new.version == 3
    assert all(torch.equal(held(new)[n], held(old)[n]) for n in ("emb", "acc"))
    assert new.rows.stats("emb").steps == 3
    push_step(old, 3)
    push_step(new, 3)
    assert_same(new, old)  # and it trains on exactly as the old job would have
    other = config(job_id="other")
    other.resume_from_job, other.resume_version = "old", 3
    other.tables[0].num_embeddings = ROWS + 1
    with pytest.raises(InvalidConfigError, match="table 'emb'"):
        cp.attach(Shard(other, torch.zeros(10)))
    cp.shutdown()


# -- torn and tampered table parts ----------------------------------------------------------


def two_checkpoints(data_dir):
    """Version 1 and 2 checkpoints of a shard with tables; (shard dir, state 1, path 2)."""
    shard = seeded()
    directory = checkpoint.shard_dir(data_dir, "job", 0)
    push_step(shard, 0)
    first = shard.capture()
    checkpoint.write(directory, first, keep=3)
    push_step(shard, 1)
    return directory, first, checkpoint.write(directory, shard.capture(), keep=3)


def rewrite(stem: str, make):
    """Rewrites a table file and its manifest entry, checksum recomputed."""
    def change(ckpt, outside):
        body = tamper.read_body(ckpt)
        index, key = stem.removeprefix("table-").split(".", 1)
        entry = body["tables"][int(index)]["files"][key]
        data, overrides = make((ckpt / f"{stem}.bin").read_bytes(), entry)
        (ckpt / f"{stem}.bin").write_bytes(data)
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest(), **overrides)
        tamper.write_body(ckpt, body)
    return change


def flip(stem: str):
    def change(ckpt, outside):
        data = bytearray((ckpt / f"{stem}.bin").read_bytes())
        data[3] ^= 0x40
        (ckpt / f"{stem}.bin").write_bytes(bytes(data))
    return change


def truncate(stem: str):
    def change(ckpt, outside):
        (ckpt / f"{stem}.bin").write_bytes((ckpt / f"{stem}.bin").read_bytes()[:-4])
    return change


def nan(old, entry):
    return struct.pack("<f", float("nan")) + old[4:], {}


def negative(old, entry):
    return tamper.floats([-1.0] * (len(old) // 4)), {}


def fewer_rows(old, entry):
    return old[: len(old) // 2], {"shape": [entry["shape"][0] // 2, *entry["shape"][1:]]}


def set_entry(key, value):
    return tamper.edit(lambda body: body["tables"][0].__setitem__(key, value))


TABLE_TAMPERINGS = {
    "weights_flipped": (flip("table-0.weights"), "table-0.weights: checksum mismatch"),
    "state_torn": (truncate("table-1.state.sum"), "table-1.state.sum: 196 bytes, manifest"),
    "weights_nan": (rewrite("table-0.weights", nan), "table 'emb': weights: non-finite"),
    "exp_avg_sq_negative": (rewrite("table-0.state.exp_avg_sq", negative),
                            "table 'emb': state.exp_avg_sq: non-finite or negative"),
    "fewer_rows": (rewrite("table-1.weights", fewer_rows), "table-1.weights: shape [25, 4]"),
    "int_weights": (rewrite("table-0.weights", lambda old, e: (old, {"dtype": "int32"})),
                    "table-0.weights: dtype 'int32', expected float32"),
    "no_tables": (tamper.edit(lambda body: body.__delitem__("tables")), "manifest lacks tables"),
    "tables_swapped": (tamper.edit(lambda body: body["tables"].reverse()),
                       "table 'emb': entry is of table 'acc'"),
    "unknown_tensor": (tamper.edit(lambda body: body["tables"][0]["files"].__setitem__(
        "evil", body["tables"][0]["files"]["weights"])), "tensor 'evil' unknown"),
    "steps_negative": (set_entry("steps", -1), "table 'emb': steps -1 is not an integer"),
    "counter_unknown": (set_entry("counters", {"evil": 1}), "counters must be a map of"),
    "applied_malformed": (tamper.edit(lambda body: body.__setitem__(
        "table_applied", [["w0", "nope", 1]])), "table_applied: an entry"),
}


@pytest.mark.parametrize("case", sorted(TABLE_TAMPERINGS))
def test_a_torn_or_tampered_table_part_is_refused_and_the_previous_one_used(tmp_path, case):
    data, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    directory, first, newest = two_checkpoints(data)
    change, reason = TABLE_TAMPERINGS[case]
    change(newest, outside)
    loaded = checkpoint.load(directory, expect=checkpoint.Expect("job", 0))
    assert loaded.state.version == 1
    assert [p for p, _ in loaded.skipped] == [newest]
    assert reason in loaded.skipped[0][1], loaded.skipped[0][1]
    cp = Checkpointer(data)
    [restored] = cp.restore_all()
    assert restored.version == 1
    for name in ("emb", "acc"):
        assert torch.equal(restored.rows.held(name), first.tables[name].tensors["weights"])
    cp.shutdown()


def test_tables_in_a_checkpoint_whose_config_has_none_are_refused(tmp_path):
    directory, _, newest = two_checkpoints(tmp_path)

    def strip(config, body):
        del config.tables[:]
    tamper.edit_config(strip)(newest, tmp_path)
    loaded = checkpoint.load(directory)
    assert "manifest has table_applied, its config has no tables" in loaded.skipped[0][1]


# -- dynamic tables (their wire form is not served yet: the checkpoint's table part alone) ----


def dynamic_table() -> TableShard:
    """A dynamic table's shard 0 of 2 (admission after 2 sightings, eviction, a cap) after a
    few steps of ids drawn from the int64 range."""
    config = TableConfig("dyn", DIM, None, num_servers=2, server_index=0, seed=1, admit_after=2,
                         evict_after_steps=3, max_rows=100, sketch_width=1 << 12,
                         sketch_halve_every=4)
    table = TableShard(config, RowwiseAdagrad(lr=0.1, initial_accumulator_value=0.5))
    gen = torch.Generator().manual_seed(5)
    for _ in range(8):
        ids = torch.unique(torch.randint(-(2**62), 2**62, (300,), generator=gen) % 400)
        ids = ids[tables_lib.dynamic_server_of("dyn", ids, 2) == 0]
        table.lookup(ids)
        table.apply(ids, torch.randn(ids.numel(), DIM, generator=gen))
    return table


def test_a_dynamic_tables_checkpoint_part_restores_exactly_and_is_validated():
    table = dynamic_table()
    state = table.capture()
    assert state.tensors.keys() == {"weights", "state.sum", "ids", "last", "sketch"}
    assert 0 < state.tensors["ids"].numel() <= 100
    raw = ckpt_tables.entry(state, files={})
    optimizer = RowwiseAdagrad(lr=0.1, initial_accumulator_value=0.5)
    read = ckpt_tables.table_state(table.config, optimizer, raw, dict(state.tensors))
    again = TableShard(table.config, RowwiseAdagrad(lr=0.1, initial_accumulator_value=0.5))
    again.restore(read)
    restored = again.capture()
    assert (restored.optimizer, restored.counters, restored.sketch) == (
        state.optimizer, state.counters, state.sketch)
    for key, tensor in state.tensors.items():
        assert torch.equal(restored.tensors[key], tensor), key
    ids = state.tensors["ids"]
    candidates = torch.arange(10**6, 10**6 + 64)
    elsewhere = candidates[tables_lib.dynamic_server_of("dyn", candidates, 2) == 1][:1]
    bad = {
        "unsorted": ({"ids": ids.flip(0)}, {}, "strictly increasing"),
        "another server's id": ({"ids": torch.cat([ids[:-1], elsewhere])}, {},
                                "not on server 0"),
        "touched in the future": ({"last": state.tensors["last"] + 1000}, {}, "last: steps"),
        "negative sketch": ({"sketch": -state.tensors["sketch"] - 1}, {}, "negative counts"),
        "halved in the future": ({}, {"halved_at": 10**6}, "halved_at"),
        "NaN accumulator": ({"state.sum": torch.full_like(state.tensors["state.sum"],
                                                          float("nan"))}, {}, "state.sum"),
    }
    for tensors, fields, message in bad.values():
        with pytest.raises(ValueError, match=message):
            ckpt_tables.table_state(table.config, optimizer, {**raw, **fields},
                                    {**state.tensors, **tensors})
    small = TableShard(replace(table.config, max_rows=ids.numel() - 1),
                       RowwiseAdagrad(lr=0.1, initial_accumulator_value=0.5))
    with pytest.raises(ValueError, match="over the cap"):
        small.restore(read)


def test_rows_pushed_after_the_job_ended_count_if_the_final_version_closes_their_round():
    """A cancel reaches one shard between a worker's row push and its dense push: the dense
    push is held for the open round, so the rows must be too; when the final version named
    closes that round, the shard ends as one that closed it before the cancel."""
    straight, ended = seeded(), seeded()
    for shard in (straight, ended):
        push_step(shard, 0)
        push_step(shard, 1, workers=("w0",))
    push_step(straight, 1, workers=("w1",))
    assert ended.set_job_state(common_pb2.JOB_STATE_CANCELLED)
    ids, rows = row_grad(100 + 10)
    status, _ = ended.rows.push("emb", worker="w1", incarnation=1, step=1, ids=ids, grads=rows)
    assert status == ps_pb2.PUSH_STATUS_JOB_DONE
    push_step(ended, 1, workers=("w1",))  # every push held: JOB_DONE, nothing applied
    assert ended.version == 1
    ended.set_job_state(common_pb2.JOB_STATE_CANCELLED, final_version=2)
    assert ended.version == 2
    assert_same(ended, straight)


def table_crash_writes(directory):
    """Three checkpoint writes of the seeded table shard (run in a forked child by
    tests/crashfork.py, whose crash hook ends the third one)."""
    shard = seeded()
    for step in range(3):
        push_step(shard, step)
        checkpoint.write(directory, shard.capture(), keep=2)


def test_a_crash_inside_a_table_part_leaves_the_previous_complete_checkpoint(tmp_path):
    """At each point in turn, the third write (version 3) exits while writing a table file (as
    a SIGKILL would): the newest loadable checkpoint is version 2, tables and all, and nothing
    is skipped."""
    points = ["partial:table-0.weights", "file:table-0.state.exp_avg", "partial:table-1.state.sum", "manifest"]
    crashed = crashfork.crash_each(points, f"{__name__}:table_crash_writes", tmp_path)
    for point, (exit_code, directory) in crashed.items():
        assert exit_code == checkpoint.CRASH_EXIT, point
        loaded = checkpoint.load(directory)
        assert loaded.skipped == [] and loaded.state.version == 2, point
        assert {n: t.optimizer["steps"] for n, t in loaded.state.tables.items()} == {"emb": 2, "acc": 2}, point
        assert list(directory.glob(".tmp-*")), point  # the torn write is left in its temp dir


def test_an_empty_dynamic_table_round_trips(tmp_path):
    """A dynamic table before its first admission holds [0, dim] rows: the base checkpoint
    writes and reads them (a multi-dimensional empty tensor once killed the writer)."""
    dyn = ps_pb2.TableSpec(name="dyn", dim=DIM, num_embeddings=0, num_shards=1,
                           optimizer="lazy_adam", lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                           admit_after=2, sketch_width=64)
    cfg = config()
    cfg.tables.append(dyn)
    shard = Shard(cfg, torch.linspace(-1, 1, 10))
    checkpoint.write(tmp_path, shard.capture(), keep=3)
    table = checkpoint.load(tmp_path).state.tables["dyn"]
    assert table.tensors["weights"].shape == (0, DIM)
    assert table.tensors["ids"].shape == (0,) and table.tensors["sketch"].shape == (4, 64)
