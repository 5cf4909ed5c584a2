"""A sync worker taking a rollback against a real in-process server (docs/architecture.md,
"Failures"): it waits until every shard is back at the rollback's version, or, when its own
pushes sent before it learned of the rollback reached shards that had already rolled back and
closed the round there, goes on from the version they are all at once each shard says it
applied the rollback. The second case hung a loaded e2e run
(tests/e2e/test_table_recovery.py, the dynamic table): the worker waited for version 40 while
both shards stood at 41."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from shardps.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc, ps_pb2
from shardps.proto.tables import dynamic_server_of
from shardps.psclient.client import PSClient
from shardps.psclient.rows import RowClient
from shardps.server.ps import checkpoint
from shardps.server.ps.daemon import ParameterServerDaemon
from shardps.worker.flat import FlatParams
from shardps.worker.jobcontext import JobContext
from shardps.worker.metrics import WorkerMetrics
from shardps.worker.outcome import End
from shardps.worker.shards import JobShards, Rewind
from tests.harness import poll

pytestmark = pytest.mark.timeout(120)

JOB, WORKER, N, DIM = "rj", "w0", 8, 4
FAILURE_S = 60.0  # a pull that has not returned by then has hung: the test fails


def config() -> ps_pb2.ShardConfig:
    """A sync job of one worker with a dynamic table "d" (admitted at the second sighting),
    checkpointed at every version."""
    return ps_pb2.ShardConfig(
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8),
        mode=common_pb2.CONSISTENCY_SYNC, workers=[WORKER], epoch=1, layout_fingerprint="test",
        checkpoint_every_steps=1, checkpoint_keep=5,
        tables=[ps_pb2.TableSpec(name="d", dim=DIM, num_embeddings=0, num_shards=2,
                                 optimizer="lazy_adam", lr=0.01, beta1=0.9, beta2=0.999,
                                 eps=1e-8, seed=1, admit_after=2, sketch_width=1 << 10)])


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(N))


@pytest.fixture
def at_version_2(tmp_path, coordinators):
    """A server with a data dir holding both shards of job JOB, trained by WORKER through
    steps 0 and 1 (rows and dense gradients), checkpointed at versions 1 and 2; the
    PSClient and RowClient of that worker, and a coordinator stub for its JobContext."""
    server = ParameterServerDaemon(coordinator=None, data_dir=str(tmp_path / "data")).start()
    shard_map = common_pb2.ShardMap(version=1, shards=[
        common_pb2.ShardRange(index=i, server_id="s0", address=server.address, offset=i * N // 2,
                              length=N // 2) for i in range(2)])
    ps = PSClient(JOB, shard_map, worker_id=WORKER, data_plane=False)
    rows = RowClient(JOB, shard_map, worker_id=WORKER)
    ps.init(torch.zeros(N), config())
    coordinator, _ = coordinators()
    channel = grpc.insecure_channel(coordinator.address)
    try:
        for step in range(2):
            step_of(ps, rows, step)
        poll(lambda: checkpointed(server) >= {(i, v) for i in range(2) for v in (1, 2)}, 30,
             what="both shards' checkpoints at versions 1 and 2")
        yield server, ps, rows, shard_map, coordinator_pb2_grpc.CoordinatorStub(channel)
    finally:
        channel.close()
        rows.close()
        ps.close()
        server.stop(0)


def step_of(ps: PSClient, rows: RowClient, step: int) -> list[int]:
    """WORKER's pushes of sync step `step` (a row gradient on each shard, then the dense one,
    which closes the round); the versions the shards answer."""
    ids = torch.arange(-20, 20)
    for shard in range(2):
        mine = ids[dynamic_server_of("d", ids, 2) == shard]
        rows.pull_rows("d", shard, mine, DIM)
        rows.push_rows("d", shard, mine, torch.ones(mine.numel(), DIM), step=step, batch_size=1)
    replies = ps.push(torch.full((N,), 0.1), step=step, base_version=[step, step], batch_size=1)
    assert all(r.status == ps_pb2.PUSH_STATUS_APPLIED for r in replies), replies
    return versions(ps)


def versions(ps: PSClient) -> list[int]:
    return list(ps.pull(torch.empty(N), timeout_s=10).versions)


def checkpointed(server: ParameterServerDaemon) -> set[tuple[int, int]]:
    """(shard, version) of each of JOB's checkpoints on the server."""
    return {(index, version) for _, index, version, _ in server.checkpointer.listing(JOB)}


def roll_back(server: ParameterServerDaemon, rollback_id: int, version: int) -> None:
    """What a server does when its heartbeat brings the coordinator's rollback."""
    server.checkpointer.apply_rollbacks(server.shards.shards(JOB), [coordinator_pb2.ServerJobView(
        job_id=JOB, rollback_id=rollback_id, rollback_version=version)])


def worker_after_rollback(stub, shard_map) -> tuple[JobContext, JobShards, FlatParams]:
    """WORKER's job context, shards and weights, its assignment announcing rollback 1 to
    version 1, which it has not taken yet; the run is stopped after FAILURE_S."""
    assignment = coordinator_pb2.WorkerAssignment(job_id=JOB, rank=0, world_size=1, epoch=1,
                                                  rollback_id=1, rollback_version=1)
    ctx = JobContext(stub, WORKER, 0, coordinator_pb2.WorkerAssignment(job_id=JOB), torch.device("cpu"),
                     WorkerMetrics(CollectorRegistry()), clock=time.monotonic)
    ctx.update_assignment(assignment)
    shards = JobShards(ctx, PSClient, shard_map, dtype=common_pb2.DTYPE_FLOAT32,
                       chunk_bytes=1 << 20)
    timer = threading.Timer(FAILURE_S, ctx.stop, args=("the test's deadline",))
    timer.daemon = True
    timer.start()
    return ctx, shards, FlatParams(Flat())


def take_rollback(shards: JobShards, flat: FlatParams) -> None:
    """The pull of step 2 finds the rollback: Rewind to version 1."""
    with pytest.raises(Rewind) as rewind:
        shards.pull("sync", 2, flat)
    assert rewind.value.step == 1


def test_a_worker_whose_own_push_moved_the_rolled_back_shards_on_goes_on_from_there(at_version_2):
    """Both shards roll back to version 1 (loading checkpoint 1, the table with it); the
    worker's push of step 1, computed before it learned of the rollback, then closes round 1
    there again, so no shard will be at version 1 again. Each shard says it applied rollback
    1, and the worker goes on from version 2 instead of waiting for version 1 for ever."""
    server, ps, rows, shard_map, stub = at_version_2
    roll_back(server, 1, 1)
    assert versions(ps) == [1, 1]
    assert step_of(ps, rows, 1) == [2, 2]  # the push that raced the rollback
    assert [i.rollback_id for i in rows.shard_infos().values()] == [1, 1]
    ctx, shards, flat = worker_after_rollback(stub, shard_map)
    try:
        take_rollback(shards, flat)
        try:
            assert shards.pull("sync", 1, flat) == [2, 2]
        except End as end:
            pytest.fail(f"the pull after the rollback did not return: {end}")
        assert torch.equal(flat.flat, _weights(ps))  # version 2's weights, in the model
    finally:
        ctx.stop("done")
        shards.close()


def test_a_push_computed_before_a_rollback_the_shards_applied_is_refused(at_version_2):
    """The same race with the push as a worker sends it, saying it has taken no rollback:
    both shards, having applied rollback 1, refuse it UNAVAILABLE and stay at version 1, so
    the worker, once it takes the rollback, goes on from version 1 and replays step 1 (no
    shard can close the round with a gradient of before the rollback and get a round
    ahead). A push that does not say (a client outside a worker) is not checked."""
    server, ps, _, shard_map, stub = at_version_2
    roll_back(server, 1, 1)
    ps.rollback_id = 0
    with pytest.raises(grpc.RpcError) as info:
        ps.push(torch.full((N,), 0.1), step=1, base_version=[1, 1], batch_size=1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "was computed before rollback 1, which the shard has applied" in info.value.details()
    assert versions(ps) == [1, 1]
    refused = server.metrics_registry.get_sample_value("shardps_ps_rejected_pushes_total",
                                                       {"reason": "before_rollback"})
    assert refused == 2  # one per shard
    ctx, shards, flat = worker_after_rollback(stub, shard_map)
    try:
        take_rollback(shards, flat)
        assert shards.pull("sync", 1, flat) == [1, 1]
        replies = shards.push(torch.full((N,), 0.1), 1, [1, 1], 1, None)
        assert all(r.status == ps_pb2.PUSH_STATUS_APPLIED for r in replies), replies
        assert versions(ps) == [2, 2]
    finally:
        ctx.stop("done")
        shards.close()


def _weights(ps: PSClient) -> torch.Tensor:
    dest = torch.empty(N)
    assert ps.pull(dest, timeout_s=10).ready
    return dest


def test_a_worker_waits_for_shards_that_have_not_applied_the_rollback(at_version_2):
    """Both shards at version 2 without having applied the rollback (their heartbeats have
    not brought it yet) look the same to a pull; the worker keeps waiting, and once they
    apply it (back to version 1 from their checkpoints) it goes on from version 1."""
    server, ps, _, shard_map, stub = at_version_2
    ctx, shards, flat = worker_after_rollback(stub, shard_map)
    got: list = []
    try:
        take_rollback(shards, flat)
        puller = threading.Thread(target=lambda: got.append(_pull_or_end(shards, flat)))
        puller.start()
        puller.join(3.0)  # a pull and ShardInfo every RESYNC_POLL_S meanwhile
        assert puller.is_alive() and not got
        assert [i.rollback_id for i in shards.rows.shard_infos().values()] == [0, 0]
        roll_back(server, 1, 1)
        puller.join(FAILURE_S + 10)
        assert got == [[1, 1]]
    finally:
        ctx.stop("done")
        shards.close()


def _pull_or_end(shards: JobShards, flat: FlatParams):
    try:
        return shards.pull("sync", 1, flat)
    except End as end:
        return end


def test_a_shard_already_at_the_rollbacks_version_takes_its_checkpoint_again(at_version_2):
    """A dynamic table changes on reads: the pull of the step the failure interrupted counted
    a sighting of its ids on a shard that stays at version 2. Rolled back to 2, the shard
    takes its checkpoint of 2 again, so the replayed pull's sighting is the only one, as in a
    run without the failure."""
    server, _, rows, _, _ = at_version_2
    ids = torch.arange(100, 140)
    mine = ids[dynamic_server_of("d", ids, 2) == 0]
    rows.pull_rows("d", 0, mine, DIM)  # round 2's pull, before the failure
    shard = server.shards.get(JOB, 0)
    saved = checkpoint.load(server.checkpointer.data_dir.shard_dir(JOB, 0), version=2).state
    assert not torch.equal(shard.capture().tables["d"].tensors["sketch"],
                           saved.tables["d"].tensors["sketch"])
    roll_back(server, 1, 2)
    assert (shard.version, shard.rollback_id) == (2, 1)
    restored = shard.capture().tables["d"]
    assert restored.counters == saved.tables["d"].counters
    for key, tensor in saved.tables["d"].tensors.items():
        assert torch.equal(restored.tensors[key], tensor), key
