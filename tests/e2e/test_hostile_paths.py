"""Identifiers that become paths, and checkpoints that are input (issue 10, items 1, 4, 9a and
12), against real daemons:

- a job id that is a path (`../..`, absolute, into another server's data dir), holds a NUL or
  a newline, or is 300 characters long is refused with INVALID_ARGUMENT, the message bounded
  and naming no server path, and nothing outside the server's data dir is created or deleted;
- a server restarted on a data dir whose newest checkpoints were tampered with (every
  checksum recomputed) starts, stays up, logs what is wrong with each, and serves the
  previous valid checkpoint; nothing appears outside its data dir;
- a job name or node id ending in a newline is refused by the coordinator;
- the version-0 checkpoint survives pruning, so a sync job whose every newer checkpoint of a
  shard is corrupt rolls back to it and completes.
"""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import grpc
import pytest
import torch

from shardps.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc, exitcodes, ps_pb2, ps_pb2_grpc
from shardps.psclient import PSClient
from shardps.runtime import rpc
from shardps.server.ps import checkpoint
from tests import harness, tamper
from tests.e2e.test_recovery import Cluster, spec

LENGTH = 64
WORKER = "worker-a"


def shard_config(job_id: str, keep: int = 5, every: int = 0) -> ps_pb2.ShardConfig:
    return ps_pb2.ShardConfig(
        job_id=job_id, shard_index=0, offset=0, length=LENGTH, total=LENGTH,
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8),
        mode=common_pb2.CONSISTENCY_ASYNC, workers=[WORKER], epoch=1,
        checkpoint_every_steps=every, checkpoint_keep=keep)


def shard_map(address: str) -> common_pb2.ShardMap:
    return common_pb2.ShardMap(version=1, shards=[common_pb2.ShardRange(
        index=0, server_id="s", address=address, offset=0, length=LENGTH)])


def init_raw(address: str, config: ps_pb2.ShardConfig) -> grpc.RpcError | None:
    """InitShard with this exact config (no client-side rewriting); the error, or None."""
    data = torch.linspace(-1, 1, LENGTH).numpy().tobytes()
    messages = [ps_pb2.InitShardRequest(config=config, dtype=common_pb2.DTYPE_FLOAT32,
                                        chunk=common_pb2.TensorChunk(offset=0, data=data))]
    with rpc.make_channel(address) as channel:
        try:
            ps_pb2_grpc.ParameterServerStub(channel).InitShard(iter(messages), timeout=10)
        except grpc.RpcError as exc:
            return exc
    return None


def tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file and directory under root (but `skip`), with a digest of each file."""
    out = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        out[str(path.relative_to(root))] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not
            path.is_symlink() else "dir" if path.is_dir() else "other")
    return out


def server(data_dir: Path, *extra: str) -> harness.Daemon:
    return harness.start("shardps-server", "--port", "0", "--coordinator", "",
                         "--data-dir", str(data_dir), *extra)


def test_job_ids_that_are_paths_are_refused_and_touch_nothing_outside_the_data_dir(tmp_path):
    """1: on main `../../b/jobs/victim` made server A delete server B's checkpoints, and a NUL
    or 300 characters answered UNKNOWN with A's absolute data dir in the message."""
    victim_dir, data_dir = tmp_path / "b", tmp_path / "a"
    b = server(victim_dir)
    with PSClient("victim", shard_map(b.address), worker_id=WORKER) as ps:
        ps.init(torch.zeros(LENGTH), shard_config("victim"))
        ps.push(torch.ones(LENGTH), step=0, base_version=0, batch_size=1)
    assert b.stop() == 0  # the final checkpoint: B now holds versions 0 and 1
    assert [v for v, _ in checkpoint.committed(victim_dir / "jobs/victim/shard-0")] == [1, 0]
    before = tree(tmp_path)

    a = server(data_dir)
    hostile = ["../../x", "../x", str(tmp_path / "abs"), "../../b/jobs/victim",
               str(victim_dir / "jobs" / "victim"), "x\0y", "x" * 300, "job\n", ".", "..",
               ".tmp-1-x", "a/b", "jöb", ""]
    for job_id in hostile:
        error = init_raw(a.address, shard_config(job_id))
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, \
            (job_id, error)
        message = error.details()
        assert str(tmp_path) not in message and str(tmp_path.resolve()) not in message
        assert len(message) < 300 and "\0" not in message and "\n" not in message, message
        # resume_from_job names a directory too: never another server's checkpoints
        if job_id:
            config = shard_config("thief")
            config.resume_from_job = job_id
            error = init_raw(a.address, config)
            assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, \
                (job_id, error)
    config = shard_config("job")
    config.workers.append("../worker")
    error = init_raw(a.address, config)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert a.proc.poll() is None, a.output()
    assert a.stop() == 0
    assert tree(tmp_path, skip=data_dir) == before, "something outside A's data dir changed"
    assert not (data_dir / "jobs").exists() or not list((data_dir / "jobs").iterdir())


def make_checkpoints(address: str, job_id: str) -> torch.Tensor:
    """Job `job_id` at version 2 with checkpoints of versions 0 (InitShard) and 1 (forced);
    returns the weights of version 1. The final checkpoint at SIGTERM adds version 2."""
    weights = torch.randn(LENGTH, generator=torch.Generator().manual_seed(len(job_id)))
    with PSClient(job_id, shard_map(address), worker_id=WORKER) as ps:
        ps.init(weights, shard_config(job_id))
        ps.push(torch.full((LENGTH,), 0.5), step=0, base_version=0, batch_size=1)
        with rpc.make_channel(address) as channel:
            reply = ps_pb2_grpc.ParameterServerStub(channel).Checkpoint(
                ps_pb2.CheckpointRequest(job_id=job_id), timeout=30)
        assert [s.version for s in reply.shards] == [1]
        expected = torch.empty(LENGTH)
        assert ps.pull(expected, timeout_s=10).versions == [1]
        ps.push(torch.full((LENGTH,), -0.25), step=1, base_version=1, batch_size=1)
    return expected


def shard_info(address: str, job_id: str) -> list[ps_pb2.ShardInfo]:
    with rpc.make_channel(address) as channel:
        return list(ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
            ps_pb2.GetShardInfoRequest(job_id=job_id), timeout=10).shards)


@pytest.mark.timeout(300)
def test_a_server_restarted_on_tampered_checkpoints_stays_up_and_uses_the_previous_ones(tmp_path):
    """4: on main 7 of these crashed the server at start, 5 loaded wrong data without a word
    and one created directories outside the data dir."""
    data_dir, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    cases = sorted(tamper.TAMPERINGS)
    jobs = {case: f"t-{case}" for case in cases}
    first = server(data_dir)
    expected = {case: make_checkpoints(first.address, job) for case, job in jobs.items()}
    expected_control = make_checkpoints(first.address, "control")
    make_checkpoints(first.address, "all-bad")
    assert first.stop() == 0
    for case, job in jobs.items():
        newest = checkpoint.committed(data_dir / "jobs" / job / "shard-0")[0][1]
        assert newest.name == "ckpt-000000000002-0000"
        tamper.TAMPERINGS[case][0](newest, outside)
    for _, path in checkpoint.committed(data_dir / "jobs" / "all-bad" / "shard-0"):
        tamper.TAMPERINGS["job_escapes_the_data_dir"][0](path, outside)
    before = tree(tmp_path, skip=data_dir)

    restarted = server(data_dir)  # raises if it does not come up
    try:
        for case, job in jobs.items():
            [info] = shard_info(restarted.address, job)
            assert info.version == 1, case
            pulled = torch.empty(LENGTH)
            with PSClient(job, shard_map(restarted.address)) as ps:
                ps.pull(pulled, timeout_s=10)
            assert torch.equal(pulled, expected[case]), case
            reasons = restarted.matches(rf"jobs/{job}/shard-0/ckpt-000000000002-0000 is "
                                        r"unusable \((.*)\); falling back")
            assert len(reasons) == 1 and tamper.TAMPERINGS[case][1] in reasons[0].group(1), \
                (case, [m.group(1) for m in reasons])
        [info] = shard_info(restarted.address, "control")
        assert info.version == 2 and not restarted.has_line("jobs/control/.* is unusable")
        assert shard_info(restarted.address, "all-bad") == []
        assert restarted.has_line(r"job all-bad shard 0: no usable checkpoint in ")
        assert not restarted.has_line("Traceback")
        # ...and it serves: a push applies on a restored shard
        job = jobs["exp_avg_of_3"]
        with PSClient(job, shard_map(restarted.address), worker_id=WORKER) as ps:
            [reply] = ps.push(torch.ones(LENGTH), step=5, base_version=1, batch_size=1)
        assert reply.status == ps_pb2.PUSH_STATUS_APPLIED and reply.version == 2
        assert expected_control is not None
        assert restarted.proc.poll() is None, restarted.output()
        assert tree(tmp_path, skip=data_dir) == before, "something appeared outside the data dir"
    finally:
        restarted.stop()


def test_job_names_and_node_ids_ending_in_a_newline_are_refused():
    """9a: `$` matched before a final newline, so `name: "job\\n"` was accepted."""
    coord = harness.start("shardps-coordinator", "--port", "0")
    try:
        with rpc.make_channel(coord.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            for yaml_text in [
                'name: "job\\n"\nmodel: {name: mlp}\ndata: {dataset: digits}\nstop: {max_steps: 5}\n',
                'name: "../../x"\nmodel: {name: mlp}\ndata: {dataset: digits}\nstop: {max_steps: 5}\n',
                'model: {name: "pkg.mod:fn\\n"}\ndata: {dataset: digits}\nstop: {max_steps: 5}\n',
            ]:
                with pytest.raises(grpc.RpcError) as info:
                    stub.SubmitJob(coordinator_pb2.SubmitJobRequest(spec_yaml=yaml_text), timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, yaml_text
            for node_id in ["server-abc\n", "server-" + "a" * 5000]:
                with pytest.raises(grpc.RpcError) as info:
                    stub.RegisterNode(coordinator_pb2.RegisterNodeRequest(
                        role=common_pb2.ROLE_SERVER, address="127.0.0.1:1", node_id=node_id),
                        timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert len(info.value.details()) < 300
            assert not stub.ListJobs(coordinator_pb2.ListJobsRequest(), timeout=10).jobs
            assert not stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
    finally:
        coord.stop()


def test_a_node_id_file_that_is_not_an_id_is_ignored(tmp_path):
    """The node id file is input too: one that is no id is logged and the server registers
    as a new node (on main it sent the file's text and was refused forever)."""
    coord = harness.start("shardps-coordinator", "--port", "0")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "node_id").write_text("../../" + "z" * 500 + "\n")
    s = harness.start("shardps-server", "--port", "0", "--coordinator", coord.address,
                      "--data-dir", str(tmp_path / "data"))
    try:
        with rpc.make_channel(coord.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            nodes = harness.poll(lambda: stub.ListNodes(coordinator_pb2.ListNodesRequest(),
                                                        timeout=10).nodes, 30, what="registered")
        assert [n.role for n in nodes] == [common_pb2.ROLE_SERVER]
        assert s.has_line("node id file holds no valid node id")
        harness.poll(lambda: (tmp_path / "data" / "node_id").read_text().strip()
                     == nodes[0].node_id, 30, what="node id saved")
    finally:
        s.stop()
        coord.stop()


def test_a_node_id_the_coordinator_refuses_for_good_ends_the_server(tmp_path):
    """Found closing issue 10: a node id file with a well-formed id of another role
    ("worker-..."), which the coordinator refuses (INVALID_ARGUMENT) however often it is sent,
    made the server retry forever, registered nowhere. Now it exits with exitcodes.REFUSED and
    a message naming the refusal and the file; an unreachable coordinator is still retried."""
    coord = harness.start("shardps-coordinator", "--port", "0")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "node_id").write_text("worker-0a1b2c\n")
    s = harness.start("shardps-server", "--port", "0", "--coordinator", coord.address,
                      "--data-dir", str(tmp_path / "data"))
    waiting = harness.start("shardps-server", "--port", "0", "--coordinator", "127.0.0.1:1",
                            "--data-dir", str(tmp_path / "other"))
    try:
        assert s.wait(60) == exitcodes.REFUSED, s.output()
        assert s.has_line(r"error: coordinator .* refuses to register this node as worker-0a1b2c "
                          r"\(INVALID_ARGUMENT: node_id: .*is not a server id"), s.output()
        assert s.has_line("remove that file to register as a new node"), s.output()
        with rpc.make_channel(coord.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            assert not stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
        harness.poll(lambda: waiting.has_line("unreachable .*UNAVAILABLE"), 30, what="an outage")
        assert waiting.poll() is None, waiting.output()  # UNAVAILABLE: retried
    finally:
        waiting.stop()
        coord.stop()


def test_a_worker_the_coordinator_refuses_for_good_exits():
    """The worker daemon's side of the same hole: a registration refused for good (here an
    --advertise-host over the coordinator's 1024-character limit) made it retry forever. Now
    it exits with exitcodes.REFUSED and the refusal in its log, and is not registered."""
    coord = harness.start("shardps-coordinator", "--port", "0")
    try:
        w = harness.start("shardps-worker", "--port", "0", "--coordinator", coord.address,
                          "--device", "cpu", "--advertise-host", "h" * 1100)
        assert w.wait(60) == exitcodes.REFUSED, w.output()
        assert w.has_line(r"error: coordinator .* refuses to register this node .*"
                          r"INVALID_ARGUMENT: address: at most 1024 characters"), w.output()
        with rpc.make_channel(coord.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            assert not stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
    finally:
        coord.stop()


def test_huge_values_a_server_refuses_are_echoed_cut(tmp_path):
    """Found closing issue 10: InitShard echoed the optimizer name, the schedule name and the
    layout fingerprint it refused whole (sent 200,000 characters, answered them all, and
    logged them). Now each is quoted as names.shown does (40 characters, escaped, with its
    length), and every refusal is cut to 1 KiB."""
    s = server(tmp_path / "data")
    assert init_raw(s.address, shard_config("base")) is None
    with rpc.make_channel(s.address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        harness.poll(lambda: stub.ListCheckpoints(ps_pb2.ListCheckpointsRequest(job_id="base"),
                                                  timeout=10).checkpoints, 30, what="checkpoint 0")
    huge = "\u00e9" + "x" * 200_000
    bad_name, bad_schedule, bad_layout = shard_config("a"), shard_config("b"), shard_config("c")
    bad_name.optimizer.name = huge
    bad_schedule.optimizer.schedule = huge
    bad_layout.resume_from_job, bad_layout.layout_fingerprint = "base", huge
    for config, field in ((bad_name, "optimizer.name"), (bad_schedule, "optimizer.schedule"),
                          (bad_layout, "of layout")):
        exc = init_raw(s.address, config)
        assert exc is not None and exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, exc)
        assert field in exc.details() and len(exc.details()) <= 300, (field, exc.details()[:400])
        assert "'\\xe9xxx" in exc.details() and "(200001 characters)" in exc.details(), exc.details()
    assert max(len(line) for line in s.lines) < 1000
    with rpc.make_channel(s.address) as channel:
        shards = ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
            ps_pb2.GetShardInfoRequest(), timeout=10).shards
    assert [shard.job_id for shard in shards] == ["base"]
    assert s.proc.poll() is None, s.output()
    s.stop()


def test_the_version_0_checkpoint_survives_pruning_and_restores(tmp_path):
    """12: with keep=1 prune deleted version 0 once a newer one existed; with that newer one
    corrupt the shard was then not restored at all."""
    data_dir = tmp_path / "data"
    s = server(data_dir)
    with PSClient("base", shard_map(s.address), worker_id=WORKER) as ps:
        ps.init(torch.zeros(LENGTH), shard_config("base", keep=1, every=1))
        for step in range(3):
            ps.push(torch.ones(LENGTH), step=step, base_version=step, batch_size=1)
    with rpc.make_channel(s.address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        harness.poll(lambda: [c.version for c in stub.ListCheckpoints(
            ps_pb2.ListCheckpointsRequest(job_id="base"), timeout=10).checkpoints] == [3, 0],
            30, what="checkpoints 3 and 0")
    s.kill()
    # Every checkpoint newer than the base made corrupt: a second one of version 3 may have
    # been committed, its older twin not yet pruned, when the SIGKILL came.
    found = checkpoint.committed(data_dir / "jobs" / "base" / "shard-0")
    assert {v for v, _ in found} == {3, 0} and found[-1][0] == 0, found
    for _, newer in found[:-1]:
        data = bytearray((newer / "weights.bin").read_bytes())
        data[0] ^= 0xFF
        (newer / "weights.bin").write_bytes(bytes(data))
    again = server(data_dir)
    try:
        [info] = shard_info(again.address, "base")
        assert info.version == 0
    finally:
        again.stop()


@pytest.mark.timeout(420)
def test_a_sync_job_whose_newer_checkpoints_are_all_corrupt_rolls_back_to_version_0(tmp_path):
    """12, the symptom: every checkpoint but the base of the killed server's shard is corrupt.
    It restores version 0, the other server rolls back to its own version 0 (kept too) and the
    job completes, instead of sitting RUNNING."""
    cluster = Cluster(tmp_path, servers=2, workers=1, worker_args=[["--step-delay-ms", "20"]])
    try:
        job_id = cluster.client.submit(spec(steps=300, every=10, workers=1).replace(
            "keep: 3", "keep: 1"))
        cluster.wait_step(job_id, 35)
        victim = cluster.server_of_shard(job_id, 1)
        cluster.servers[victim].signal(signal.SIGKILL)
        cluster.servers[victim].wait(10)
        directory = cluster.data_dirs[victim] / "jobs" / job_id / "shard-1"
        found = checkpoint.committed(directory)
        assert found[-1][0] == 0 and len(found) >= 2, found
        for version, path in found:
            if version:
                data = bytearray((path / "weights.bin").read_bytes())
                data[len(data) // 2] ^= 0x01
                (path / "weights.bin").write_bytes(bytes(data))
        restarted = cluster.restart_server(victim)
        final = cluster.final(job_id, timeout=150)
        assert final.state == common_pb2.JOB_STATE_COMPLETED, final.reason
        assert final.rollback_version == 0
        assert restarted.has_line(rf"job {job_id} shard 1 restored from ckpt-000000000000-")
    finally:
        cluster.stop()
