"""The data plane (raw TCP push/pull beside gRPC): discovery, fallback, refusals with gRPC
codes, the token, and a server that restarts on the same address."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from shardps.proto import common_pb2, dataplane, ps_pb2, ps_pb2_grpc
from shardps.psclient import PSClient, connection
from shardps.runtime import rpc
from shardps.server.ps.daemon import ParameterServerDaemon
from tests.harness import poll
from tests.integration.test_ps import ASYNC, SYNC, reference_adam, shard_config, shard_map

TOTAL = 50_000
APPLIED, DUPLICATE = ps_pb2.PUSH_STATUS_APPLIED, ps_pb2.PUSH_STATUS_DUPLICATE


def data_plane_port(server) -> int:
    with rpc.make_channel(server.address) as channel:
        reply = ps_pb2_grpc.ParameterServerStub(channel).GetDataPlane(
            ps_pb2.GetDataPlaneRequest(), timeout=10)
    assert reply.protocol == dataplane.PROTOCOL
    return reply.port


def started(**kwargs) -> ParameterServerDaemon:
    return ParameterServerDaemon(coordinator=None, metrics_port=0, **kwargs).start()


def test_the_server_names_its_data_port_and_without_one_clients_use_grpc():
    on, off = started(), started(data_port=-1)
    try:
        assert data_plane_port(on) == on.data_port > 0
        assert data_plane_port(off) == 0 and off.data_server is None
        init, grad = torch.randn(TOTAL), torch.randn(TOTAL)
        with PSClient("job", shard_map([on, off], TOTAL), worker_id="w0") as client:
            client.init(init, shard_config(ASYNC))
            assert [r.status for r in client.push(grad, step=0, base_version=0, batch_size=1)] \
                == [APPLIED, APPLIED]
            dest = torch.empty(TOTAL)
            assert client.pull(dest, min_version=1).ready
        assert torch.equal(dest, reference_adam(init, [grad]))
        # Both servers counted the push and the pull, whichever way it came.
        for server in (on, off):
            shard = server.shards.shards("job")[0]
            assert shard.pushes_applied == 1
    finally:
        on.stop(0)
        off.stop(0)


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "socket"])
def test_refusals_come_back_as_grpc_codes_and_change_nothing(shared_memory):
    server = started(shared_memory=shared_memory)
    try:
        smap = shard_map([server], TOTAL)
        init = torch.randn(TOTAL)
        with PSClient("job", smap, worker_id="w0") as client:
            client.init(init, shard_config(ASYNC))
            bad = torch.ones(TOTAL)
            bad[TOTAL - 3] = float("nan")  # in the last piece received
            with pytest.raises(grpc.RpcError) as err:
                client.push(bad, step=0, base_version=0, batch_size=1)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "non-finite" in err.value.details()
            # The next push on the same client reconnects and applies.
            grad = torch.randn(TOTAL)
            assert client.push(grad, step=0, base_version=0, batch_size=1)[0].status == APPLIED
            # Decided by its header: the elements are drained, the connection kept.
            assert client.push(grad, step=0, base_version=0, batch_size=1)[0].status == DUPLICATE
            dest = torch.empty(TOTAL)
            assert client.pull(dest, min_version=1).ready
        assert torch.equal(dest, reference_adam(init, [grad]))
        with PSClient("job", smap, worker_id="intruder") as client:
            with pytest.raises(grpc.RpcError) as err:
                client.push(grad, step=1, base_version=1, batch_size=1)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with PSClient("no-such-job", smap, worker_id="w0") as client:
            with pytest.raises(grpc.RpcError) as err:
                client.pull(torch.empty(TOTAL), timeout_s=1)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as err:
                client.push(grad, step=0, base_version=0, batch_size=1)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        text = server.metrics_registry
        rejected = {s.labels["reason"]: s.value for m in text.collect() for s in m.samples
                    if s.name == "shardps_ps_rejected_pushes_total"}
        assert rejected["non_finite"] == 1 and rejected["unknown_shard"] == 1
        assert rejected["unknown_worker"] == 1
        with PSClient("job", smap) as client:
            assert client.pull(dest, min_version=1).ready
        assert torch.equal(dest, reference_adam(init, [grad]))  # unchanged by the refusals
    finally:
        server.stop(0)


def test_the_token_is_checked_at_hello():
    rpc.configure(rpc.Security(token="s3cret"))
    try:
        server = started()
    finally:
        rpc.configure(rpc.Security())
    try:
        for token in (None, "wrong"):
            with pytest.raises(dataplane.DataPlaneError) as err:
                connection.Connection("127.0.0.1", server.data_port, None, token)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        conn = connection.Connection("127.0.0.1", server.data_port, None, "s3cret")
        request = ps_pb2.PullRequest(job_id="job", shard_index=0, dtype=common_pb2.DTYPE_FLOAT32)
        with pytest.raises(dataplane.DataPlaneError) as err:  # authenticated, but no such job
            conn.pull(request, torch.empty(4), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        conn.close()
    finally:
        server.stop(0)


def test_a_server_restarted_on_the_same_address_is_found_on_its_new_data_port():
    first = started()
    port = first.port
    init = torch.randn(TOTAL)
    client = PSClient("job", shard_map([first], TOTAL), worker_id="w0")
    try:
        client.init(init, shard_config(ASYNC))
        assert client.pull(torch.empty(TOTAL)).ready  # leaves an idle data connection
        first.stop(0)
        second = ParameterServerDaemon(port=port, coordinator=None).start()
        try:
            with PSClient("job", shard_map([second], TOTAL)) as fresh:
                poll(lambda: _tried(lambda: fresh.init(init, shard_config(ASYNC))), 10,
                     what="the restarted server taking the shard")
            # The idle connection to the old process fails once (UNAVAILABLE: callers retry)...
            with pytest.raises(grpc.RpcError) as err:
                client.pull(torch.empty(TOTAL))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # ...and the next call asks the new process for its data port.
            dest = torch.empty(TOTAL)
            assert client.pull(dest).ready and torch.equal(dest, init)
        finally:
            second.stop(0)
    finally:
        client.close()


def _tried(fn) -> bool:
    try:
        fn()
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return False
    return True


def pulls_served(server) -> float:
    return sum(s.value for m in server.metrics_registry.collect() for s in m.samples
               if s.name == "shardps_ps_pulls_total")


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
@pytest.mark.parametrize("total", [10_000, 700_000], ids=["pipelined", "a-thread-per-shard"])
def test_a_pull_sent_ahead_by_push_is_read_by_the_matching_pull_and_dropped_by_another(
        total, data_plane):
    # Over gRPC nothing is sent ahead (the RPC transport sends the pull when asked): the
    # servers serve, and the client reads, exactly the same.
    servers = [started(), started()]
    try:
        gen = torch.Generator().manual_seed(3)
        init = torch.randn(total, generator=gen)
        grads = [torch.randn(total, generator=gen) for _ in range(3)]
        dest = torch.empty(total)
        with PSClient("job", shard_map(servers, total), worker_id="w0",
                      data_plane=data_plane) as client:
            client.init(init, shard_config(SYNC))
            before = [pulls_served(s) for s in servers]
            client.push(grads[0], step=0, base_version=0, batch_size=1,
                        then_pull={"min_version": 1, "timeout_s": 5})
            result = client.pull(dest, min_version=1, timeout_s=5)  # reads the answer sent ahead
            assert result.ready and result.versions == [1, 1]
            # One pull each was served (counted once its bytes are out, so maybe just after).
            served = lambda: [pulls_served(s) - b for s, b in zip(servers, before, strict=True)]  # noqa: E731
            poll(lambda: served() == [1, 1], 5, what="each server counting its pull")
            time.sleep(0.2)
            assert served() == [1, 1]
            assert torch.equal(dest, reference_adam(init, grads[:1]))
            # A pull with other arguments drops the one sent ahead (and its connection).
            client.push(grads[1], step=1, base_version=1, batch_size=1,
                        then_pull={"min_version": 2, "timeout_s": 5})
            assert client.pull(dest, min_version=0, timeout_s=3).versions == [2, 2]
            assert torch.equal(dest, reference_adam(init, grads[:2]))
            # Closing with a pull still ahead is clean, and the servers keep serving.
            client.push(grads[2], step=2, base_version=2, batch_size=1,
                        then_pull={"min_version": 3, "timeout_s": 5})
        with PSClient("job", shard_map(servers, total)) as client:
            assert client.pull(dest, min_version=3, timeout_s=5).ready
        assert torch.equal(dest, reference_adam(init, grads))
    finally:
        for server in servers:
            server.stop(0)


def test_a_pull_sent_ahead_with_an_unknown_keyword_is_refused_before_anything_is_sent():
    server = started()
    try:
        with PSClient("job", shard_map([server], 100), worker_id="w0") as client:
            client.init(torch.zeros(100), shard_config(SYNC))
            with pytest.raises(TypeError, match="then_pull takes"):
                client.push(torch.ones(100), step=0, base_version=0, batch_size=1,
                            then_pull={"min_versoin": 1})
            assert server.shards.get("job", 0).version == 0  # no push arrived (one worker: it would apply)
            client.push(torch.ones(100), step=0, base_version=0, batch_size=1)
            assert client.pull(torch.empty(100), min_version=1, timeout_s=5).versions == [1]
    finally:
        server.stop(0)
