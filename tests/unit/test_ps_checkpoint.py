"""Shard checkpoints: exact round trip of weights and Adam state, atomic writes, fallback past
torn or corrupt checkpoints, pruning, and a crash at every point of a write (subprocesses)."""

import os
import threading
import time

import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.server.ps import checkpoint
from shardps.server.ps.checkpointer import Checkpointer
from shardps.server.ps.errors import FencedError, InvalidConfigError, UnknownWorkerError
from shardps.server.ps.registry import ShardRegistry
from shardps.server.ps.shard import Shard
from tests import crashfork, tamper
from tests.harness import poll


def config(mode=common_pb2.CONSISTENCY_SYNC, length=10, workers=("w0", "w1"), every=0, keep=3):
    return ps_pb2.ShardConfig(
        job_id="job", shard_index=0, offset=0, length=length, total=length,
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8, schedule="constant"),
        mode=mode, workers=list(workers), epoch=1, layout_fingerprint="fp",
        checkpoint_every_steps=every, checkpoint_keep=keep)


def grad(seed, length=10):
    return torch.randn(length, generator=torch.Generator().manual_seed(seed))


def run_steps(shard, steps, workers=("w0", "w1")):
    for step in steps:
        for i, w in enumerate(workers):
            shard.push(grad(step * 10 + i), worker_id=w, incarnation=1, step=step)


def same_state(a: Shard, b: Shard):
    ta, tb = a.capture().tensors, b.capture().tensors
    assert ta.keys() == tb.keys()  # weights, and Adam's state once a step made it
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert (a.version, a.adam_step) == (b.version, b.adam_step)


def new_shard(**kw):
    return Shard(config(**kw), torch.linspace(-1, 1, kw.get("length", 10)))


def test_round_trip_is_exact_and_training_continues_bitwise(tmp_path):
    straight, resumed = new_shard(), new_shard()
    run_steps(straight, range(3))
    run_steps(resumed, range(3))
    path = checkpoint.write(tmp_path, resumed.capture(), keep=3)
    assert path.name == "ckpt-000000000003-0000"
    assert not list(tmp_path.glob(".tmp-*"))
    assert {p.name for p in path.iterdir()} == {
        "weights.bin", "exp_avg.bin", "exp_avg_sq.bin", "step.bin", "manifest.msgpack"}
    restored = Shard.from_state(checkpoint.load(tmp_path).state)
    same_state(restored, resumed)
    run_steps(straight, range(3, 6))
    run_steps(restored, range(3, 6))
    same_state(restored, straight)


def test_a_sync_shards_pull_mirror_is_checkpointed_and_seeds_the_restored_shards_pulls(tmp_path):
    """Both workers pulled version 3 compressed; the round to 4 closes and the shard is
    checkpointed: the checkpoint keeps their mirror (version 3), and the restored shard
    sends a worker without a copy, at version 4, what the workers hold there in the straight
    run. A manifest whose mirror names another version is refused."""
    shard = new_shard()
    run_steps(shard, range(2))
    held = shard.mirrors.copies("int8:4")

    def pull_all(copies, tag):
        weights, version = shard.capture().tensors["weights"], shard.version
        return [copies.reply(w, tag, weights, tag + 1, version=version) for w in ("w0", "w1")]

    pull_all(held, 0)  # version 2: dense
    run_steps(shard, [2])
    pull_all(held, 1)  # version 3: a delta
    run_steps(shard, [3])
    path = checkpoint.write(tmp_path, shard.capture(), keep=3)
    assert "mirror.bin" in {p.name for p in path.iterdir()}
    state = checkpoint.read(path)
    assert state.mirror is not None and (state.mirror.setting, state.mirror.version) == ("int8:4", 3)
    assert torch.equal(state.mirror.tensor, held.held("w0"))
    straight = pull_all(held, 2)  # version 4: what the straight run's workers hold
    restored = Shard.from_state(state)
    weights = restored.capture().tensors["weights"]
    reset = restored.mirrors.copies("int8:4").reply("w0", 2, weights, 3, version=4)
    assert straight[0].delta is not None and reset.dense is not None
    assert torch.equal(reset.dense, held.held("w0"))
    assert not torch.equal(reset.dense, weights)  # not the weights: the workers' copy
    tamper.edit(lambda body: body["mirror"].update(version=1))(path, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="mirror: version 1, expected 3 or 4"):
        checkpoint.read(path)


def test_applied_push_table_survives_so_a_retried_push_is_a_duplicate(tmp_path):
    shard = new_shard(mode=common_pb2.CONSISTENCY_ASYNC)
    shard.push(grad(1), worker_id="w0", incarnation=1, step=0)
    checkpoint.write(tmp_path, shard.capture(), keep=3)
    restored = Shard.from_state(checkpoint.load(tmp_path).state)
    retried = restored.push(grad(1), worker_id="w0", incarnation=1, step=0)
    assert retried.status == ps_pb2.PUSH_STATUS_DUPLICATE and restored.version == 1
    assert restored.push(grad(2), worker_id="w0", incarnation=1, step=1).version == 2


def test_an_open_sync_round_is_not_in_the_checkpoint(tmp_path):
    shard = new_shard()
    run_steps(shard, range(2))
    shard.push(grad(5), worker_id="w0", incarnation=1, step=2)  # accepted, round 2 open
    state = shard.capture()
    assert state.version == 2 and state.applied[("w0", 1)] == 1
    checkpoint.write(tmp_path, state, keep=3)
    restored = Shard.from_state(checkpoint.load(tmp_path).state)
    # w0 pushes step 2 again after the restore: it must count, not be a duplicate.
    assert restored.push(grad(5), worker_id="w0", incarnation=1,
                         step=2).status == ps_pb2.PUSH_STATUS_ACCEPTED


def test_keeps_the_newest_k_and_the_base_and_removes_leftover_temp_dirs(tmp_path):
    shard = new_shard(mode=common_pb2.CONSISTENCY_ASYNC)
    (tmp_path / ".tmp-9-dead").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("not ours")
    for step in range(5):
        shard.push(grad(step), worker_id="w0", incarnation=1, step=step)
        checkpoint.write(tmp_path, shard.capture(), keep=2)
    # The oldest (here version 1, the first written) is the base every rollback can reach.
    assert [v for v, _ in checkpoint.committed(tmp_path)] == [5, 4, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000000001-0000", "ckpt-000000000004-0000", "ckpt-000000000005-0000",
        "notes.txt"]


def test_same_version_twice_gets_a_second_directory(tmp_path):
    shard = new_shard()
    first = checkpoint.write(tmp_path, shard.capture(), keep=3)
    second = checkpoint.write(tmp_path, shard.capture(), keep=3)
    assert (first.name, second.name) == ("ckpt-000000000000-0000", "ckpt-000000000000-0001")
    assert checkpoint.load(tmp_path).path == second


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_manifest",
                                    "corrupt_manifest", "delete_file"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    shard = new_shard(mode=common_pb2.CONSISTENCY_ASYNC)
    checkpoint.write(tmp_path, shard.capture(), keep=3)
    shard.push(grad(1), worker_id="w0", incarnation=1, step=0)
    newest = checkpoint.write(tmp_path, shard.capture(), keep=3)
    if damage == "flip_byte":
        data = bytearray((newest / "exp_avg.bin").read_bytes())
        data[5] ^= 0x01
        (newest / "exp_avg.bin").write_bytes(bytes(data))
    elif damage == "truncate":
        data = (newest / "weights.bin").read_bytes()
        (newest / "weights.bin").write_bytes(data[:-4])
    elif damage == "delete_manifest":
        (newest / checkpoint.MANIFEST).unlink()
    elif damage == "corrupt_manifest":
        data = bytearray((newest / checkpoint.MANIFEST).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / checkpoint.MANIFEST).write_bytes(bytes(data))
    else:
        (newest / "step.bin").unlink()
    loaded = checkpoint.load(tmp_path)
    assert loaded.state.version == 0
    assert [p for p, _ in loaded.skipped] == [newest]
    assert "falling back to the previous one" in caplog.text


def test_no_pickle_anywhere(tmp_path):
    shard = new_shard()
    run_steps(shard, range(1))
    path = checkpoint.write(tmp_path, shard.capture(), keep=3)
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f  # pickle protocol 2+ header
    weights = torch.frombuffer(bytearray((path / "weights.bin").read_bytes()), dtype=torch.float32)
    assert torch.equal(weights, shard.capture().tensors["weights"])  # raw little-endian fp32


def test_fencing_refuses_dead_incarnations_and_keeps_it_across_a_restore(tmp_path):
    shard = new_shard(mode=common_pb2.CONSISTENCY_ASYNC)
    shard.fence({"w0": 1, "w1": 1})
    shard.update_workers(["w1"], 2)
    shard.fence({"w1": 1})  # w0 incarnation 1 declared dead
    with pytest.raises(FencedError, match="^fenced:"):
        shard.push(grad(1), worker_id="w0", incarnation=1, step=0)
    with pytest.raises(UnknownWorkerError):  # a newer incarnation, not (yet) in the job
        shard.push(grad(1), worker_id="w0", incarnation=2, step=0)
    checkpoint.write(tmp_path, shard.capture(), keep=3)
    restored = Shard.from_state(checkpoint.load(tmp_path).state)
    with pytest.raises(FencedError):
        restored.push(grad(1), worker_id="w0", incarnation=1, step=5)
    restored.update_workers(["w1", "w0"], 3)
    restored.fence({"w1": 1, "w0": 2})
    with pytest.raises(FencedError):  # live again, but only as incarnation 2
        restored.push(grad(1), worker_id="w0", incarnation=1, step=6)
    assert restored.push(grad(1), worker_id="w0", incarnation=2,
                         step=0).status == ps_pb2.PUSH_STATUS_APPLIED


def test_checkpointer_writes_every_n_versions_and_restores_with_lost_count(tmp_path):
    cp = Checkpointer(tmp_path)
    registry = ShardRegistry(cp.attach)
    shard = new_shard(mode=common_pb2.CONSISTENCY_ASYNC, every=3, keep=2)
    registry.put(shard)
    for step in range(7):
        shard.push(grad(step), worker_id="w0", incarnation=1, step=step)
    assert cp.writer.flush()
    directory = checkpoint.shard_dir(tmp_path, "job", 0)
    written = [v for v, _ in checkpoint.committed(directory)]
    # A periodic copy still queued when a newer one comes is superseded, so 3 may be missing;
    # keep=2 keeps the newest two and the base, version 0.
    assert written[0] == 6 and written[-1] == 0 and len(written) <= 3
    assert all(v % 3 == 0 for v in written)
    cp.shutdown()

    again = Checkpointer(tmp_path)
    [restored] = again.restore_all()
    assert restored.version == 6
    assert again.metrics.lost.labels("job")._value.get() == 1  # version 7 was never written
    assert [(r.job_id, r.version, r.lost_updates) for r in again.take_reports()] == [
        ("job", 6, 1)]
    again.shutdown()


def test_rollback_loads_an_older_version_and_drops_the_newer_ones(tmp_path):
    cp = Checkpointer(tmp_path)
    shard = new_shard(every=2)
    ShardRegistry(cp.attach).put(shard)
    for step in range(5):
        run_steps(shard, [step])
        assert cp.writer.flush()  # no copy superseded: 0, 2 and 4 are all written
    reference = new_shard()
    run_steps(reference, range(2))
    cp.recovery.rollback(shard, rollback_id=1, version=2)
    same_state(shard, reference)
    assert shard.rollback_id == 1
    directory = checkpoint.shard_dir(tmp_path, "job", 0)
    assert [v for v, _ in checkpoint.committed(directory)] == [2, 0]
    run_steps(shard, range(2, 5))  # the workers replay: the same pushes count again
    assert shard.version == 5
    cp.shutdown()


def test_a_forced_capture_that_times_out_while_the_push_copies_for_it_takes_that_copy(tmp_path):
    """The old race: a Checkpoint RPC's wait for `at_version` ran out while the push that
    reached the version was copying the state for it, and the push then failed (KeyError)
    after the version had moved. The request now lives under the shard's condition: the push
    fills it and the waiter, though its wait timed out, takes exactly that capture."""
    cp = Checkpointer(tmp_path)
    shard = new_shard(mode=common_pb2.CONSISTENCY_ASYNC, workers=("w0",))
    ShardRegistry(cp.attach).put(shard)
    timeout = 0.2
    updater = shard._core.updater
    copy, copied_on = updater.copy_tensors, []

    def slow_copy():
        copied_on.append(threading.current_thread().name)
        time.sleep(5 * timeout)  # a copy that outlasts the wait (a big shard, a loaded machine)
        return copy()

    updater.copy_tensors = slow_copy  # type: ignore[method-assign]
    results = []
    waiter = threading.Thread(name="checkpoint-rpc", target=lambda: results.append(
        cp.checkpoint_now(shard, at_version=1, timeout=timeout)))
    waiter.start()
    # The request is registered (and the waiter blocked) before the push comes.
    poll(lambda: shard._core.captures._pending, 10, interval=0.01, what="a pending capture")
    result = shard.push(grad(0), worker_id="w0", incarnation=1, step=0)
    waiter.join(30)
    assert (result.status, shard.version) == (ps_pb2.PUSH_STATUS_APPLIED, 1)
    [(version, path)] = results
    assert version == 1 and checkpoint.read(path).version == 1
    assert copied_on == [threading.current_thread().name]  # copied once, by the push
    assert shard.push(grad(1), worker_id="w0", incarnation=1, step=1).version == 2
    cp.shutdown()


def test_a_forced_capture_that_no_push_reaches_takes_the_current_state(tmp_path):
    cp = Checkpointer(tmp_path)
    shard = new_shard(mode=common_pb2.CONSISTENCY_ASYNC, workers=("w0",))
    ShardRegistry(cp.attach).put(shard)
    shard.push(grad(0), worker_id="w0", incarnation=1, step=0)
    version, path = cp.checkpoint_now(shard, at_version=5, timeout=0.05)
    assert version == 1 and checkpoint.read(path).version == 1
    assert not shard._core.captures._pending  # the timed-out request is gone
    cp.shutdown()


def test_a_restored_shard_keeps_its_checkpoints_and_a_new_one_starts_afresh(tmp_path):
    cp = Checkpointer(tmp_path)
    shard = new_shard(mode=common_pb2.CONSISTENCY_ASYNC, workers=("w0",), every=1)
    ShardRegistry(cp.attach).put(shard)
    for step in range(2):
        shard.push(grad(step), worker_id="w0", incarnation=1, step=step)
    assert cp.writer.flush()
    cp.shutdown()
    directory = checkpoint.shard_dir(tmp_path, "job", 0)
    again = Checkpointer(tmp_path)
    [restored] = again.restore_all()
    assert restored.restored and restored.version == 2
    ShardRegistry(again.attach).put(restored)
    assert again.writer.flush()
    assert [v for v, _ in checkpoint.committed(directory)] == [2, 1, 0]
    ShardRegistry(again.attach).put(new_shard(mode=common_pb2.CONSISTENCY_ASYNC,
                                              workers=("w0",)))  # a new InitShard
    assert again.writer.flush()
    assert [v for v, _ in checkpoint.committed(directory)] == [0]
    again.shutdown()


def crash_writes(directory):
    """Three checkpoint writes of a 1000-element async shard (run in a forked child by
    tests/crashfork.py, whose crash hook ends the third one)."""
    cfg = ps_pb2.ShardConfig(job_id="job", shard_index=0, offset=0, length=1000, total=1000,
                             optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                                                  eps=1e-8, schedule="constant"),
                             mode=common_pb2.CONSISTENCY_ASYNC, workers=["w0"], epoch=1)
    shard = Shard(cfg, torch.zeros(1000))
    for step in range(3):
        shard.push(torch.full((1000,), 0.1 * (step + 1)), worker_id="w0", incarnation=1, step=step)
        checkpoint.write(directory, shard.capture(), keep=2)


def test_a_crash_at_any_point_of_a_write_leaves_a_complete_checkpoint(tmp_path):
    """At every point in turn, the third write (version 3) dies (a forked process exits there);
    the newest loadable checkpoint is then version 2 (crash before the rename) or 3 (after
    it), never a torn one."""
    crashed = crashfork.crash_each(checkpoint.CRASH_POINTS, f"{__name__}:crash_writes", tmp_path)
    for point, (exit_code, directory) in crashed.items():
        assert exit_code == checkpoint.CRASH_EXIT, point
        committed_now = point in ("renamed", "parent_synced", "pruned")
        loaded = checkpoint.load(directory)
        assert loaded.skipped == [], point  # every committed directory verifies: nothing torn
        assert loaded.state.version == (3 if committed_now else 2), point
        assert torch.equal(loaded.state.tensors["weights"],
                           checkpoint.read(loaded.path).tensors["weights"]), point
        checkpoint.prune(directory, keep=2)
        assert not list(directory.glob(".tmp-*")), point


# -- hostile data dirs: tampered manifests, paths, the base checkpoint --------------------------


def two_checkpoints(data_dir):
    """Checkpoints of job "job" shard 0 at versions 1 and 2 (with Adam state) in the data dir's
    layout; returns (shard dir, state at version 1, path of version 2)."""
    shard = new_shard(mode=common_pb2.CONSISTENCY_ASYNC, workers=("worker-a",))
    directory = checkpoint.shard_dir(data_dir, "job", 0)
    shard.push(grad(1), worker_id="worker-a", incarnation=1, step=0)
    first = shard.capture()
    checkpoint.write(directory, first, keep=3)
    shard.push(grad(2), worker_id="worker-a", incarnation=1, step=1)
    return directory, first, checkpoint.write(directory, shard.capture(), keep=3)


@pytest.mark.parametrize("case", sorted(tamper.TAMPERINGS))
def test_a_tampered_checkpoint_is_refused_naming_why_and_the_previous_one_is_used(tmp_path, case):
    """Checksums recomputed, so only validation can tell (the e2e twin restarts a real server
    on such a data dir: tests/e2e/test_hostile_paths.py)."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    directory, first, newest = two_checkpoints(data)
    change, reason = tamper.TAMPERINGS[case]
    change(newest, outside)
    loaded = checkpoint.load(directory, expect=checkpoint.Expect("job", 0))
    assert loaded.state.version == 1
    assert [p for p, _ in loaded.skipped] == [newest]
    assert reason in loaded.skipped[0][1]
    assert torch.equal(loaded.state.tensors["weights"], first.tensors["weights"])
    cp = Checkpointer(data)
    [restored] = cp.restore_all()
    assert restored.version == 1
    assert torch.equal(restored.capture().tensors["weights"], first.tensors["weights"])
    cp.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "outside"]


def test_a_shard_whose_every_checkpoint_is_tampered_is_not_restored_and_nothing_raises(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    directory, _, newest = two_checkpoints(data)
    for _, path in checkpoint.committed(directory):
        tamper.TAMPERINGS["job_escapes_the_data_dir"][0](path, outside)
    cp = Checkpointer(data)
    assert cp.restore_all() == []
    cp.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "outside"]


def test_prune_keeps_the_base_checkpoint_every_rollback_can_reach(tmp_path):
    """12: with keep=1 the version-0 checkpoint written at InitShard stays, and a rollback to a
    version whose checkpoints are gone lands there."""
    cp = Checkpointer(tmp_path)
    shard = new_shard(every=1, keep=1)
    ShardRegistry(cp.attach).put(shard)
    for step in range(4):
        run_steps(shard, [step])
        assert cp.writer.flush()
    directory = checkpoint.shard_dir(tmp_path, "job", 0)
    assert [v for v, _ in checkpoint.committed(directory)] == [4, 0]
    cp.recovery.rollback(shard, rollback_id=1, version=2)
    same_state(shard, new_shard())
    cp.shutdown()


def test_job_ids_that_are_not_identifiers_never_reach_the_filesystem(tmp_path):
    data = tmp_path / "data"
    cp = Checkpointer(data)
    registry = ShardRegistry(cp.attach)
    for job_id in ["../../x", "/abs/x", "../data2/jobs/victim", "a\0b", "x" * 300, "job\n"]:
        cfg = config()
        cfg.job_id = job_id
        with pytest.raises(InvalidConfigError) as info:
            registry.put(Shard(cfg, torch.zeros(10)))
        assert str(tmp_path) not in str(info.value) and len(str(info.value)) < 250
        cfg = config()
        cfg.resume_from_job = job_id
        with pytest.raises(InvalidConfigError):
            registry.put(Shard(cfg, torch.zeros(10)))
    cp.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert not (data / "jobs").exists()
    with pytest.raises(ValueError):
        checkpoint.shard_dir(data, "job", -1)


def test_restore_skips_entries_that_are_not_ids_or_lead_outside_the_data_dir(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    two_checkpoints(elsewhere)
    data = tmp_path / "data"
    (data / "jobs").mkdir(parents=True)
    os.symlink(elsewhere / "jobs" / "job", data / "jobs" / "linked")      # a job dir link
    (data / "jobs" / "real").mkdir()
    os.symlink(elsewhere / "jobs" / "job" / "shard-0", data / "jobs" / "real" / "shard-0")
    os.symlink(elsewhere / "jobs" / "job", data / "jobs" / "bad name")
    (data / "jobs" / "job" / "shard-٣").mkdir(parents=True)                # not ASCII digits
    assert checkpoint.shard_dirs(data) == []
    cp = Checkpointer(data)
    assert cp.restore_all() == [] and cp.listing() == []
    cp.shutdown()


def test_a_symlinked_checkpoint_directory_is_never_read(tmp_path):
    elsewhere, _, newest = two_checkpoints(tmp_path / "elsewhere")
    directory = checkpoint.shard_dir(tmp_path / "data", "job", 0)
    directory.mkdir(parents=True)
    os.symlink(newest, directory / newest.name)
    assert checkpoint.committed(directory) == []
    checkpoint.prune(directory, keep=1)
    assert newest.is_dir()


def test_the_node_id_file_is_validated_both_ways(tmp_path, caplog):
    cp = Checkpointer(tmp_path)
    (tmp_path / "node_id").write_text("../../etc/passwd\n")
    assert cp.node_id() == ""
    assert "no valid node id" in caplog.text
    cp.save_node_id("server-0a1b2c")
    assert cp.node_id() == "server-0a1b2c"
    cp.save_node_id("server-x\n/../..")
    assert cp.node_id() == "server-0a1b2c"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / ".node_id.tmp")  # a planted link is replaced, not written through
    cp.save_node_id("server-ffffff")
    assert cp.node_id() == "server-ffffff" and victim.read_text() == "keep"
    (tmp_path / "node_id").unlink()
    os.symlink(victim, tmp_path / "node_id")
    assert cp.node_id() == ""
    cp.shutdown()
