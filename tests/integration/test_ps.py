"""The parameter server in-process on port 0, driven over real gRPC by the real PSClient, and
with the real coordinator for registration and the job views its heartbeats bring."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.client.scrape import scrape
from shardps.proto import codec, common_pb2, coordinator_pb2, coordinator_pb2_grpc, exitcodes, ps_pb2, ps_pb2_grpc
from shardps.proto.layout import make_layout
from shardps.psclient import PSClient
from shardps.runtime import rpc
from shardps.server.ps import daemon as ps_daemon
from shardps.server.ps.daemon import ParameterServerDaemon
from tests.cluster import RegisteredWorker
from tests.harness import poll

F32, BF16, F16 = common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_FLOAT16
SYNC, ASYNC = common_pb2.CONSISTENCY_SYNC, common_pb2.CONSISTENCY_ASYNC
APPLIED = ps_pb2.PUSH_STATUS_APPLIED
ADAM = dict(name="adam", lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


@pytest.fixture
def servers(request):
    """Started standalone servers (count from the `servers` parametrization, default 1)."""
    count = getattr(request, "param", 1)
    started = [ParameterServerDaemon(coordinator=None, metrics_port=0).start()
               for _ in range(count)]
    yield started
    for server in started:
        server.stop(0)


def shard_map(servers, total: int) -> common_pb2.ShardMap:
    """Splits [0, total) into one contiguous range per server, as the coordinator would."""
    ranges, start = [], 0
    for i, server in enumerate(servers):
        end = total * (i + 1) // len(servers)
        ranges.append(common_pb2.ShardRange(index=i, server_id=f"server-{i}",
                                            address=server.address, offset=start,
                                            length=end - start))
        start = end
    return common_pb2.ShardMap(version=1, shards=ranges)


def shard_config(mode=ASYNC, workers=("w0",), **opt) -> ps_pb2.ShardConfig:
    return ps_pb2.ShardConfig(optimizer=common_pb2.OptimizerConfig(**{**ADAM, **opt}),
                              mode=mode, workers=list(workers), epoch=1,
                              layout_fingerprint="test")


def reference_adam(init: torch.Tensor, grads: list[torch.Tensor], **opt) -> torch.Tensor:
    cfg = {**ADAM, **opt}
    param = init.clone().requires_grad_(True)
    adam = torch.optim.Adam([param], lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                            eps=cfg["eps"], weight_decay=cfg["weight_decay"], fused=True)
    for grad in grads:
        param.grad = grad
        adam.step()
    return param.detach()


def stub(server) -> ps_pb2_grpc.ParameterServerStub:
    return ps_pb2_grpc.ParameterServerStub(rpc.make_channel(server.address))


def pulled(client: PSClient, total: int, dtype=torch.float32, **kw) -> torch.Tensor:
    dest = torch.full((total,), -7.0, dtype=dtype)
    result = client.pull(dest, **kw)
    assert result.ready
    return dest


@pytest.mark.parametrize("servers", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
def test_init_push_pull_round_trip_in_each_dtype(servers, dtype, data_plane):
    total = 10_007
    gen = torch.Generator().manual_seed(0)
    init, grad = torch.randn(total, generator=gen), torch.randn(total, generator=gen)
    wire = codec.torch_dtype(dtype)
    with PSClient("job", shard_map(servers, total), dtype=dtype, chunk_bytes=4096,
                  worker_id="w0", data_plane=data_plane) as client:
        client.init(init, shard_config())
        assert torch.equal(pulled(client, total, wire), init.to(wire))
        replies = client.push(grad, step=0, base_version=0, batch_size=8)
        assert [(r.status, r.version) for r in replies] == [(APPLIED, 1)] * len(servers)
        after = pulled(client, total, torch.float32, min_version=1)
    # The server received the gradient in the wire dtype and keeps fp32 weights.
    expected = reference_adam(init, [grad.to(wire).float()])
    assert torch.equal(after, expected.to(wire).float())


@pytest.mark.parametrize("servers", [2], indirect=True)
def test_async_pushes_equal_torch_adam_over_the_whole_vector(servers):
    total = 30_011
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(total, generator=gen)
    grads = [torch.randn(total, generator=gen) for _ in range(6)]
    with PSClient("job", shard_map(servers, total), worker_id="w0") as client:
        client.init(init, shard_config())
        for step, grad in enumerate(grads):
            replies = client.push(grad, step=step, base_version=step, batch_size=1)
            assert {r.status for r in replies} == {APPLIED}
        weights = pulled(client, total, min_version=len(grads))
    assert torch.equal(weights, reference_adam(init, grads))


@pytest.mark.parametrize("servers", [2], indirect=True)
def test_sync_pull_waits_for_the_round_and_times_out_not_ready(servers):
    total = 5_000
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(total, generator=gen)
    g0, g1 = torch.randn(total, generator=gen), torch.randn(total, generator=gen)
    smap = shard_map(servers, total)
    config = shard_config(SYNC, workers=["w0", "w1"])
    with PSClient("job", smap, worker_id="w0") as w0, PSClient("job", smap, worker_id="w1") as w1:
        w0.init(init, config)
        assert {r.status for r in w0.push(g0, step=0, base_version=0, batch_size=2)} == {
            ps_pb2.PUSH_STATUS_ACCEPTED}
        dest = torch.zeros(total)
        start = time.monotonic()
        result = w0.pull(dest, min_version=1, timeout_s=0.3)
        assert not result.ready and result.versions == [0, 0]
        assert 0.3 <= time.monotonic() - start < 10
        assert torch.equal(dest, torch.zeros(total))  # nothing streamed

        waiting = []
        thread = threading.Thread(
            target=lambda: waiting.append(w0.pull(dest, min_version=1, timeout_s=30)))
        thread.start()
        assert {r.status for r in w1.push(g1, step=0, base_version=0, batch_size=6)} == {APPLIED}
        thread.join(30)
    assert waiting and waiting[0].ready and waiting[0].versions == [1, 1]
    mean = g0 * (2 / 8)
    mean.add_(g1, alpha=6 / 8)
    assert torch.equal(dest, reference_adam(init, [mean]))


@pytest.mark.timeout(240)
def test_fifty_million_parameters_push_and_pull_through_chunks(servers):
    total = 50_000_000  # 200 MB of fp32: far over any single gRPC message limit
    gen = torch.Generator().manual_seed(3)
    init = torch.empty(total).uniform_(-1, 1, generator=gen)
    grad = torch.empty(total).uniform_(-1, 1, generator=gen)
    start = time.monotonic()
    with PSClient("big", shard_map(servers, total), worker_id="w0") as client:
        client.init(init, shard_config())
        replies = client.push(grad, step=0, base_version=0, batch_size=1)
        weights = torch.empty(total)
        result = client.pull(weights, min_version=1, timeout_s=60)
    elapsed = time.monotonic() - start
    assert result.ready and [r.status for r in replies] == [APPLIED]
    assert torch.equal(weights, reference_adam(init, [grad]))
    print(f"50M parameters: init + push + pull took {elapsed:.1f} s")


def push_raw(target, header: ps_pb2.PushHeader, chunks):
    messages = [ps_pb2.PushRequest(header=header)]
    messages += [ps_pb2.PushRequest(chunk=common_pb2.TensorChunk(offset=o, data=d))
                 for o, d in chunks]
    return target.Push(iter(messages), timeout=30)


def f32(n: int, value: float = 1.0) -> bytes:
    return torch.full((n,), value).numpy().tobytes()


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_malformed_pushes_get_status_codes_and_leave_weights_unchanged(servers):
    total = 1_000
    init = torch.randn(total, generator=torch.Generator().manual_seed(4))
    client = PSClient("job", shard_map(servers, total), worker_id="w0")
    client.init(init, shard_config())
    ps = stub(servers[0])

    def header(**kw):
        base = dict(job_id="job", shard_index=0, worker_id="w0", step=0, dtype=F32,
                    batch_size=1, length=total)
        return ps_pb2.PushHeader(**{**base, **kw})

    nan = torch.ones(total)
    nan[17] = float("nan")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = {
        "wrong length": (header(length=total - 1), [(0, f32(total - 1))], invalid),
        "gap": (header(), [(0, f32(100)), (200, f32(800))], invalid),
        "overlap": (header(), [(0, f32(500)), (400, f32(600))], invalid),
        "past the end": (header(), [(0, f32(total)), (total, f32(10))], invalid),
        "short": (header(), [(0, f32(total - 1))], invalid),
        "negative offset": (header(), [(-1, f32(total))], invalid),
        "torn element": (header(), [(0, f32(total)[:-1])], invalid),
        "non-finite": (header(), [(0, nan.numpy().tobytes())], invalid),
        "unknown dtype": (header(dtype=9), [(0, f32(total))], invalid),
        "unknown job": (header(job_id="nope"), [(0, f32(total))], grpc.StatusCode.NOT_FOUND),
        "unknown shard": (header(shard_index=3), [(0, f32(total))], grpc.StatusCode.NOT_FOUND),
        "unknown worker": (header(worker_id="w9"), [(0, f32(total))],
                           grpc.StatusCode.FAILED_PRECONDITION),
        "bf16 sent as fp32 bytes": (header(dtype=BF16), [(0, f32(total))], invalid),
    }
    for name, (hdr, chunks, code) in cases.items():
        assert status_of(lambda h=hdr, c=chunks: push_raw(ps, h, c)) == code, name
    headless = iter([ps_pb2.PushRequest(chunk=common_pb2.TensorChunk(data=f32(total)))])
    assert status_of(lambda: ps.Push(headless, timeout=30)) == invalid
    pull = ps_pb2.PullRequest(job_id="job", shard_index=0, dtype=9)
    assert status_of(lambda: list(ps.Pull(pull, timeout=30))) == invalid
    pull = ps_pb2.PullRequest(job_id="nope", shard_index=0, dtype=F32)
    assert status_of(lambda: list(ps.Pull(pull, timeout=30))) == grpc.StatusCode.NOT_FOUND

    info = ps.GetShardInfo(ps_pb2.GetShardInfoRequest(job_id="job"), timeout=10).shards[0]
    assert (info.version, info.pushes_applied, dict(info.worker_clocks)) == (0, 0, {})
    assert torch.equal(pulled(client, total), init)
    # The same push, well formed, is applied: nothing above was taken for step 0.
    assert push_raw(ps, header(), [(0, f32(total))]).status == APPLIED
    client.close()


def test_finished_job_refuses_pushes_and_still_serves_pulls(servers):
    total = 2_000
    init = torch.randn(total, generator=torch.Generator().manual_seed(5))
    server = servers[0]
    with PSClient("job", shard_map(servers, total), worker_id="w0") as client:
        client.init(init, shard_config(SYNC, workers=["w0", "w1"]))
        dest = torch.zeros(total)
        waiting = []
        thread = threading.Thread(
            target=lambda: waiting.append(client.pull(dest, min_version=1, timeout_s=30)))
        thread.start()
        start = time.monotonic()
        # What the heartbeat delivers once the coordinator has ended the job.
        server.shards.apply_views([coordinator_pb2.ServerJobView(
            job_id="job", state=common_pb2.JOB_STATE_CANCELLED, epoch=1,
            live_workers=["w0", "w1"])])
        thread.join(30)
        assert waiting[0].job_done and not waiting[0].ready
        assert time.monotonic() - start < 10
        replies = client.push(torch.ones(total), step=0, base_version=0, batch_size=1)
        assert [r.status for r in replies] == [ps_pb2.PUSH_STATUS_JOB_DONE]
        result = client.pull(dest, min_version=0, timeout_s=5)
        assert result.ready and result.job_done and torch.equal(dest, init)
    info = stub(server).GetShardInfo(ps_pb2.GetShardInfoRequest(), timeout=10).shards
    assert [(s.job_id, s.state) for s in info] == [("job", common_pb2.JOB_STATE_CANCELLED)]


def test_drop_job_frees_its_shards(servers):
    with PSClient("job", shard_map(servers, 100), worker_id="w0") as client:
        client.init(torch.zeros(100), shard_config())
    ps = stub(servers[0])
    assert ps.DropJob(ps_pb2.DropJobRequest(job_id="job"), timeout=10).dropped == 1
    assert ps.DropJob(ps_pb2.DropJobRequest(job_id="job"), timeout=10).dropped == 0
    assert not ps.GetShardInfo(ps_pb2.GetShardInfoRequest(), timeout=10).shards


def test_health_check_answers_serving(servers):
    health = health_pb2_grpc.HealthStub(rpc.make_channel(servers[0].address))
    for service in ("", "shardps.v1.ParameterServer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_endpoint_serves_the_documented_names(servers):
    total = 1_000
    with PSClient("job", shard_map(servers, total), worker_id="w0") as client:
        client.init(torch.zeros(total), shard_config())
        client.push(torch.ones(total), step=0, base_version=0, batch_size=1)
        pulled(client, total)
        with pytest.raises(grpc.RpcError):
            push_raw(stub(servers[0]), ps_pb2.PushHeader(job_id="nope", worker_id="w0", length=1), [])
    expected = [
        'shardps_ps_pushes_total{job="job",status="applied"} 1.0',
        'shardps_ps_pulls_total{job="job"} 1.0',
        f'shardps_ps_push_bytes_total{{job="job"}} {4 * total}.0',
        f'shardps_ps_pull_bytes_total{{job="job"}} {4 * total}.0',
        'shardps_ps_version{job="job",shard="0"} 1.0',
        f'shardps_ps_shard_bytes{{job="job",shard="0"}} {12 * total}.0',
        'shardps_ps_rejected_pushes_total{reason="unknown_shard"} 1.0',
        'shardps_ps_staleness_count{job="job"} 1.0',
        'shardps_ps_waiting_pulls{job="job",shard="0"} 0.0',
        'shardps_ps_live_workers{job="job",shard="0"} 1.0',
        'shardps_ps_short_rounds_total{job="job",shard="0"} 0.0',
        'shardps_ps_max_clock_spread{job="job",shard="0"} 0.0',
        "shardps_ps_push_seconds_count 1.0",
        "shardps_ps_pull_seconds_count 1.0",
        "shardps_ps_apply_seconds_count 1.0",
    ]
    # A pull is counted once its last byte is sent, which the client can have read first: the
    # counters are read again until they are all in, for at most 10 s.
    missing = list(expected)

    def all_in() -> bool:
        lines = scrape(servers[0].metrics_address).splitlines()
        missing[:] = [line for line in expected if line not in lines]
        return not missing

    with contextlib.suppress(TimeoutError):
        poll(all_in, 10, interval=0.05, what="every documented counter")
    assert not missing, missing


def server_node(client, node_id=None):
    return next((n for n in client.nodes() if n.role == common_pb2.ROLE_SERVER
                 and (node_id is None or n.node_id == node_id)), None)


def test_registers_its_advertised_address_again_after_a_restart_and_deregisters(coordinators):
    first, client = coordinators()
    server = ParameterServerDaemon(coordinator=first.address, metrics_port=0,
                                   advertise="ps.example:9999").start()
    try:
        node = poll(lambda: server_node(client), 30, what="registration")
        assert (node.address, node.state) == ("ps.example:9999", coordinator_pb2.NODE_STATE_ALIVE)
        assert node.metrics_address == f"ps.example:{server.metrics_endpoint.port}"
        # The coordinator restarts on the same port and knows nobody: the server registers
        # again under the same id.
        port = first.port
        first.stop(0)
        client.close()
        _, client = coordinators(port=port)
        again = poll(lambda: server_node(client), 30, what="re-registration")
        assert again.node_id == node.node_id and again.address == "ps.example:9999"
    finally:
        server.stop(0)
    # The goodbye heartbeat marks it dead at once (its 10 s lease has not run out).
    assert server_node(client, node.node_id).state == coordinator_pb2.NODE_STATE_DEAD
    client.close()


def test_applies_the_coordinators_job_states_and_live_workers(coordinators):
    coordinator, client = coordinators(lease_ms=1000)
    server = ParameterServerDaemon(coordinator=coordinator.address).start()
    stub = coordinator_pb2_grpc.CoordinatorStub(rpc.make_channel(coordinator.address))
    w0, w1 = RegisteredWorker(stub), RegisteredWorker(stub)
    try:
        poll(lambda: server_node(client), 10, what="the server registering")
        job_id = client.submit("model: {name: mlp}\ndata: {dataset: digits}\n"
                               "cluster: {servers: 1, workers: 2}\nstop: {max_steps: 5}\n")
        w0, w1 = sorted((w0, w1), key=lambda w: w.wait_assignment().rank)
        shards = stub.SetLayout(coordinator_pb2.SetLayoutRequest(
            job_id=job_id, node_id=w0.node_id, incarnation=w0.incarnation,
            layout=make_layout([("w", (10, 10))])), timeout=10).shard_map
        assert [s.address for s in shards.shards] == [server.address]
        with PSClient(job_id, shards, worker_id=w0.node_id,
                      incarnation=w0.incarnation) as client0:
            client0.init(torch.zeros(100), shard_config(SYNC, workers=[w0.node_id, w1.node_id]))
            stub.ActivateJob(coordinator_pb2.ActivateJobRequest(
                job_id=job_id, node_id=w0.node_id, incarnation=w0.incarnation), timeout=10)
            assert client0.push(torch.ones(100), step=0, base_version=0,
                                batch_size=1)[0].status == ps_pb2.PUSH_STATUS_ACCEPTED
            # w1 stops heartbeating; when its lease expires the coordinator drops it, and the
            # server, told on its next heartbeat, completes round 0 with w0 alone.
            w1.stop(goodbye=False)
            assert client0.pull(torch.zeros(100), min_version=1, timeout_s=10).ready
            info = server.shards.get(job_id, 0).info()
            assert (list(info.live_workers), info.epoch) == ([w0.node_id], 2)
            assert info.short_rounds == 1
            client.cancel(job_id)
            poll(lambda: server.shards.get(job_id, 0).frozen, 10, what="frozen")
            reply = client0.push(torch.ones(100), step=1, base_version=1, batch_size=1)[0]
            assert reply.status == ps_pb2.PUSH_STATUS_JOB_DONE
    finally:
        w0.stop()
        w1.stop()
        server.stop(0)
        client.close()


def test_unreachable_coordinator_blocks_neither_start_nor_stop():
    with socket.socket() as sock:  # a port that refuses connections
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    start = time.monotonic()
    server = ParameterServerDaemon(coordinator=dead).start()
    with PSClient("job", shard_map([server], 10), worker_id="w0") as client:
        client.init(torch.zeros(10), shard_config())
    server.stop(0)
    assert server.wait(0) and time.monotonic() - start < 15
    assert server.link is not None and not server.link.registered


def test_cli_exits_bind_failed_when_the_port_is_taken(servers):
    port = servers[0].port
    with pytest.raises(SystemExit) as err:
        ps_daemon.main(["--port", str(port), "--coordinator", ""])
    assert err.value.code == exitcodes.BIND_FAILED


def test_stop_ends_waiting_pulls_at_once():
    server = ParameterServerDaemon().start()
    client = PSClient("job", shard_map([server], 10), worker_id="w0")
    client.init(torch.zeros(10), shard_config(SYNC))
    errors = []

    def pull():
        try:
            client.pull(torch.zeros(10), min_version=1, timeout_s=50)
        except grpc.RpcError as exc:
            errors.append(exc.code())

    thread = threading.Thread(target=pull)
    thread.start()
    poll(lambda: server.shards.get("job", 0).waiting_pulls == 1, 10, what="a waiting pull")
    start = time.monotonic()
    server.stop(grace=20)
    thread.join(30)
    client.close()
    assert errors == [grpc.StatusCode.UNAVAILABLE] and time.monotonic() - start < 10


@pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data-plane"])
def test_calls_beyond_the_concurrency_limit_are_refused_with_resource_exhausted(data_plane):
    # 2 handler threads allow 8 concurrent RPCs (or data-plane connections); 12 pulls that wait
    # on a version never reached.
    server = ParameterServerDaemon(grpc_workers=2).start()
    try:
        with PSClient("job", shard_map([server], 10), worker_id="w0") as client:
            client.init(torch.zeros(10), shard_config(SYNC))
        codes = []

        def pull():
            with PSClient("job", shard_map([server], 10), worker_id="w0",
                          data_plane=data_plane) as client:
                try:
                    result = client.pull(torch.zeros(10), min_version=1, timeout_s=1)
                    codes.append("not ready" if not result.ready else "ready")
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        threads = [threading.Thread(target=pull) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, "not ready"}, codes
        with PSClient("job", shard_map([server], 10), worker_id="w0") as client:  # and it still serves
            assert client.pull(torch.zeros(10), timeout_s=3).ready
    finally:
        server.stop(0)
