"""Overlap (docs/network.md, "Overlap"): pushes in pieces sent while backward runs, pulls
landing module by module during forward; exact, and refused cleanly when malformed."""

from __future__ import annotations

import grpc
import pytest
import torch

from shardps.proto import common_pb2, dataplane, ps_pb2, ps_pb2_grpc
from shardps.psclient import PSClient, connection
from shardps.runtime import rpc
from tests.integration.test_dataplane import started
from tests.integration.test_ps import SYNC, reference_adam, shard_config, shard_map
from tests.integration.test_semantics import (
    STEPS,
    cluster,  # noqa: F401 - the fixture
    exported,
    job_spec,
    max_abs_diff,
    single_process,
)

pytestmark = pytest.mark.timeout(240)

TOTAL = 50_000
APPLIED = ps_pb2.PUSH_STATUS_APPLIED
BUCKETS = [(0, 7_000), (7_000, 20_000), (20_000, 31_000), (31_000, TOTAL)]


SHARED_MEMORY = pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "socket"])


@SHARED_MEMORY
def test_a_push_in_pieces_sent_out_of_order_is_applied_as_the_whole_push(shared_memory):
    # The second server has no data plane: it gets a whole push at finish.
    on, off = started(shared_memory=shared_memory), started(data_port=-1)
    try:
        init, grad = torch.randn(TOTAL), torch.randn(TOTAL)
        with PSClient("job", shard_map([on, off], TOTAL), worker_id="w0") as client:
            client.init(init, shard_config(SYNC))
            push = client.begin_push(grad, step=0, base_version=0, batch_size=1,
                                     buckets=BUCKETS, then_pull={"min_version": 1})
            assert push.pieces == 3  # buckets 0, 1 and half of 2 lie in the data-plane shard
            for bucket in (3, 2, 1):  # as backward finishes them: last layers first
                push.ready(bucket)
            assert [r.status for r in push.finish()] == [APPLIED, APPLIED]
            dest = torch.empty(TOTAL)
            inflight = client.start_pull(dest, min_version=1, timeout_s=10)  # the one ahead
            ready, versions, _ = inflight.heads()
            assert ready and versions == [1, 1]
            inflight.wait(0, 10)
            assert inflight.finish() == TOTAL * 4
        assert torch.equal(dest, reference_adam(init, [grad]))
    finally:
        on.stop(0)
        off.stop(0)


def test_a_push_abandoned_half_way_changes_nothing_and_the_whole_push_then_applies():
    server = started()
    try:
        init, grad = torch.randn(TOTAL), torch.randn(TOTAL)
        with PSClient("job", shard_map([server], TOTAL), worker_id="w0") as client:
            client.init(init, shard_config(SYNC))
            push = client.begin_push(grad, step=0, base_version=0, batch_size=1, buckets=BUCKETS)
            push.ready(3)
            push.ready(2)  # backward fails here (a NaN loss, a stop): the push is dropped
            push.cancel()
            # Applied, not a duplicate: the server recorded nothing of the broken push.
            assert [r.status for r in client.push(grad, step=0, base_version=0,
                                                  batch_size=1)] == [APPLIED]
            dest = torch.empty(TOTAL)
            assert client.pull(dest, min_version=1, timeout_s=10).ready
        assert torch.equal(dest, reference_adam(init, [grad]))
    finally:
        server.stop(0)


def _pieces_push(port: int, pieces: list[tuple[int, int]], length: int,
                 then_pull: bool = True) -> dataplane.DataPlaneError:
    """Sends one push of ones in `pieces` (header: `length` elements) on a fresh data
    connection and returns the refusal; `then_pull`: a pull on a new connection then sees
    the shard still at version 0."""
    conn = connection.Connection("127.0.0.1", port, None, None)
    header = ps_pb2.PushHeader(job_id="job", shard_index=0, worker_id="w0", step=0,
                               dtype=common_pb2.DTYPE_FLOAT32, batch_size=1, length=length,
                               pieces=len(pieces))
    try:
        conn.start_pieces(header, 10)
        for offset, count in pieces:
            conn.send_piece(offset, torch.ones(count), common_pb2.DTYPE_FLOAT32, 10)
        with pytest.raises(dataplane.DataPlaneError) as err:
            conn.finish_push(10)
        if then_pull:
            again = connection.Connection("127.0.0.1", port, None, None)
            request = ps_pb2.PullRequest(job_id="job", shard_index=0,
                                         dtype=common_pb2.DTYPE_FLOAT32, timeout_ms=1000)
            assert again.pull(request, torch.empty(length), 10).version == 0
            again.close()
        return err.value
    finally:
        conn.close()


@SHARED_MEMORY
def test_pieces_that_do_not_cover_the_shard_once_are_refused_and_change_nothing(shared_memory):
    server = started(shared_memory=shared_memory)
    try:
        init = torch.randn(TOTAL)
        smap = shard_map([server], TOTAL)
        with PSClient("job", smap, worker_id="w0") as client:
            client.init(init, shard_config(SYNC))
        half = TOTAL // 2
        for pieces, why in (([(0, half), (half - 1, half)], "overlap at element"),
                            ([(0, half), (half + 1, half - 1)], "missing"),
                            ([(half, half), (0, half - 10)], "missing")):
            err = _pieces_push(server.data_port, pieces, TOTAL)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert why in err.details(), err.details()
        # A piece past the end: refused, its bytes drained (the pieces after it too).
        err = _pieces_push(server.data_port, [(TOTAL - 5, 10), (0, TOTAL - 10)], TOTAL)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "piece [" in err.details()
        # More pieces than elements: refused by the header alone.
        err = _pieces_push(server.data_port, [(0, 1)] * 2, 1, then_pull=False)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Over the Push RPC the field is refused: its chunks carry their own offsets.
        with rpc.make_channel(server.address) as channel:
            header = ps_pb2.PushHeader(job_id="job", shard_index=0, worker_id="w0", step=0,
                                       dtype=common_pb2.DTYPE_FLOAT32, batch_size=1,
                                       length=TOTAL, pieces=1)
            with pytest.raises(grpc.RpcError) as rpc_err:
                ps_pb2_grpc.ParameterServerStub(channel).Push(
                    iter([ps_pb2.PushRequest(header=header)]), timeout=10)
            assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "pieces" in rpc_err.value.details()
        shard = server.shards.shards("job")[0]
        assert shard.version == 0 and shard.pushes_applied == 0
        grad = torch.randn(TOTAL)
        with PSClient("job", smap, worker_id="w0") as client:
            push = client.begin_push(grad, step=0, base_version=0, batch_size=1, buckets=BUCKETS)
            assert [r.status for r in push.finish()] == [APPLIED]
            dest = torch.empty(TOTAL)
            assert client.pull(dest, min_version=1, timeout_s=10).ready
        assert torch.equal(dest, reference_adam(init, [grad]))
    finally:
        server.stop(0)


def _metric(worker, name: str, **labels: str) -> float:
    return sum(s.value for m in worker.registry.collect() for s in m.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


SMALL_BUCKETS = {"overlap": True, "bucket_bytes": 4096}  # small buckets: several per model


def test_sync_with_overlap_is_single_process_adam_bitwise_and_pushes_leave_during_backward(
        cluster):  # noqa: F811
    c = cluster(servers=1, workers=1)
    # 4.3M parameters in 6 buckets (one per parameter): backward is long enough for the
    # sender to put the later layers' buckets on the wire while it runs.
    spec = job_spec(stop={"max_steps": STEPS, "eval_every": 1000}, transport=SMALL_BUCKETS,
                    model={"name": "mlp", "kwargs": {"hidden": [2048, 2048]}})
    job = c.wait(c.submit(spec), timeout=180)
    assert job.state == common_pb2.JOB_STATE_COMPLETED, job.reason
    weights, versions = exported(c, job.job_id)
    assert versions == [STEPS]
    fused = single_process(spec, STEPS, fused=True)
    assert all(torch.equal(weights[k], fused[k]) for k in fused), max_abs_diff(weights, fused)
    worker = c.workers[0]
    during = _metric(worker, "shardps_worker_overlap_pieces_total", sent="during")
    after = _metric(worker, "shardps_worker_overlap_pieces_total", sent="after")
    waits = _metric(worker, "shardps_worker_bucket_wait_seconds_count", direction="pull")
    print(f"overlap, {STEPS} steps: {during:.0f} pieces sent during backward, {after:.0f} "
          f"after; {waits:.0f} forward waits on landing weights")
    assert during + after == 6 * STEPS and during > 0
    assert waits == 3 * STEPS  # each linear layer waited for its weights on every pull


def test_sync_four_workers_three_servers_train_bitwise_alike_with_overlap_on_and_off(
        cluster):  # noqa: F811
    c = cluster(servers=3, workers=4)
    results = {}
    for overlap in (True, False):
        spec = job_spec(workers=4, servers=3, stop={"max_steps": STEPS, "eval_every": 1000},
                        transport={**SMALL_BUCKETS, "overlap": overlap})
        spec["name"] = f"overlap-{overlap}".lower()
        job = c.wait(c.submit(spec), timeout=150)
        assert job.state == common_pb2.JOB_STATE_COMPLETED, job.reason
        results[overlap], versions = exported(c, job.job_id)
        assert versions == [STEPS] * 3
    on, off = results[True], results[False]
    assert all(torch.equal(on[k], off[k]) for k in on), max_abs_diff(on, off)
    during = sum(_metric(w, "shardps_worker_overlap_pieces_total", sent="during")
                 for w in c.workers)
    assert during > 0
