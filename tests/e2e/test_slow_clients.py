"""Slow and silent clients against live daemons: what they may cost the server (threads,
time) is bounded, and the clients that do their part are served meanwhile.

Each test measures the daemon's threads in /proc/PID/status; on a server that gave every
accepted socket or waiting call a thread of its own they grow by hundreds.
"""

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch

from shardps.proto import common_pb2, dataplane, ps_pb2, ps_pb2_grpc
from shardps.psclient import PSClient
from shardps.runtime import callguard, rpc
from shardps.runtime import daemon as daemon_lib
from shardps.server.ps import dataserver
from tests import harness

JOB = "patient"
WORKER = "worker-real"
TOTAL = 4096
TOKEN = "slow-clients-token"
SERVICE = "/shardps.v1.ParameterServer/"
FLOODER = "127.0.0.2"  # another host on loopback (Linux routes all of 127/8 there)


def threads(daemon: harness.Daemon) -> int:
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def shard_map(server, total=TOTAL) -> common_pb2.ShardMap:
    return common_pb2.ShardMap(version=1, shards=[common_pb2.ShardRange(
        index=0, server_id="s", address=server.address, offset=0, length=total)])


def create_job(server, job=JOB, total=TOTAL, mode=common_pb2.CONSISTENCY_ASYNC) -> None:
    config = ps_pb2.ShardConfig(optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9,
                                beta2=0.999, eps=1e-8), mode=mode, workers=[WORKER], epoch=1)
    with PSClient(job, shard_map(server, total)) as ps:
        ps.init(torch.zeros(total), config)


def train_step(server) -> int:
    """One pull and one push of the real worker, on a new data-plane connection (so each step
    says hello again); the version its push made."""
    flat = torch.empty(TOTAL)
    with PSClient(JOB, shard_map(server), worker_id=WORKER) as ps:
        result = ps.pull(flat, timeout_s=5)
        step = result.versions[0]
        [reply] = ps.push(torch.ones(TOTAL), step=step, base_version=step, batch_size=1)
    assert reply.status == ps_pb2.PUSH_STATUS_APPLIED, reply
    return reply.version


class Trickle:
    """`count` sockets to 127.0.0.1:port that each send one more byte of `opening` every
    `period` s, on one thread; a socket the server closes is opened again."""

    def __init__(self, port: int, count: int, opening: bytes, period: float = 1.0,
                 source: str = "127.0.0.1"):
        self.port, self.count, self.opening, self.period = port, count, opening, period
        self.source = source
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Trickle":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        socks: list[socket.socket | None] = [None] * self.count
        sent = [0] * self.count
        try:
            while not self._stop.is_set():
                for i in range(self.count):
                    if self._stop.is_set():
                        break
                    try:
                        if socks[i] is None:
                            socks[i] = socket.create_connection(("127.0.0.1", self.port), timeout=2,
                                                                source_address=(self.source, 0))
                            sent[i] = 0
                        pos = sent[i] % len(self.opening)
                        socks[i].send(self.opening[pos : pos + 1])
                        sent[i] += 1
                    except OSError:
                        if socks[i] is not None:
                            socks[i].close()
                            socks[i] = None
                            self.reopened += 1
                self._stop.wait(self.period)
        finally:
            for sock in socks:
                if sock is not None:
                    sock.close()


FLOOD = """
import socket, sys, time, collections
port, source, opening = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[5])
rate, count = int(sys.argv[3]), int(sys.argv[4])
socks, opened, start = collections.deque(), 0, time.monotonic()
while time.monotonic() - start < 120:
    if opened >= (time.monotonic() - start) * rate:
        time.sleep(0.01)
        continue
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0))
        socks.append(sock)
        opened += 1
        sock.send(opening)
    except OSError:
        pass
    while len(socks) > count:
        socks.popleft().close()
"""


class Flood:
    """A process that opens `rate` connections a second to 127.0.0.1:port from `source`, each
    sending `opening` and then nothing, and keeps the newest `count` of them open: the churn
    that pushes pending connections out. It ends when the block ends (or after 120 s)."""

    def __init__(self, port: int, opening: bytes, source: str, rate: int = 3000, count: int = 300):
        self._args = [str(port), source, str(rate), str(count), opening.hex()]
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "Flood":
        self._proc = subprocess.Popen([sys.executable, "-c", FLOOD, *self._args])
        return self

    def __exit__(self, *exc) -> None:
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(30)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    done = harness.run_cli("certs", str(directory))
    assert done.returncode == 0, done.stderr
    return directory


@pytest.fixture
def secured(request, certs, tmp_path):
    """A standalone server with the token (and, for "tls", a certificate; no client
    certificates asked, so that anyone may try the handshake), and this process set up as
    one of its workers."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    flags = ["--token-file", str(token_file)]
    security = rpc.Security(token=TOKEN)
    if request.param == "tls":
        flags += ["--tls-cert", str(certs / "node.pem"), "--tls-key", str(certs / "node-key.pem")]
        security = rpc.Security(ca=(certs / "ca.pem").read_bytes(), token=TOKEN)
    server = harness.start("shardps-server", "--port", "0", "--coordinator", "", *flags)
    rpc.configure(security)
    try:
        yield server, request.param
    finally:
        rpc.configure(rpc.Security())


@pytest.mark.parametrize("secured", ["token", "tls"], indirect=True)
def test_slow_hellos_cost_no_threads_and_cannot_push_out_the_worker(secured):
    """Issue 10, item 2: 300 sockets from one host that send one byte of a hello (or of a TLS
    handshake) a second, opened again as soon as they are pushed out, hold no server thread and
    no connection slot; and the real worker on another host, saying hello anew at every step,
    has none of its connections pushed out (the gate pushes out the busiest host's oldest
    pending connection; it used to push out the oldest of all, the worker's among them)."""
    server, kind = secured
    create_job(server)
    with rpc.make_channel(server.address) as channel:
        port = ps_pb2_grpc.ParameterServerStub(channel).GetDataPlane(
            ps_pb2.GetDataPlaneRequest(), timeout=5).port
    version = train_step(server)
    base = threads(server)
    # Never a whole hello: a huge token length (or a TLS record header announcing 512 bytes).
    opening = (b"\x16\x03\x01\x02\x00" + bytes(range(1, 60)) if kind == "tls"
               else dataplane.MAGIC + dataplane.TOKEN_LEN.pack(dataplane.MAX_TOKEN_BYTES))
    peak, steps, failed = base, 0, []
    with Trickle(port, 300, opening, source=FLOODER) as trickle, Flood(port, opening[:8], FLOODER):
        end = time.monotonic() + 2 * dataserver.HELLO_DEADLINE_S + 2
        while time.monotonic() < end:
            try:
                version = train_step(server)
            except dataplane.DataPlaneError as exc:
                failed.append(exc)
            steps += 1
            peak = max(peak, threads(server))
            time.sleep(0.05)
        reopened = trickle.reopened
    assert steps >= 10, steps
    assert not failed, f"{len(failed)} of {steps} steps failed: {failed[0]}"
    assert peak <= base + 8, f"{peak} threads under 300 slow hellos, {base} before"
    # They were pushed out (beyond the pending limit) or timed out, and came back.
    assert reopened >= 300 - dataserver.MAX_PENDING, reopened
    assert server.proc.poll() is None, server.output()
    assert version >= steps


def test_streams_and_calls_that_never_send_a_message_end_and_control_calls_are_answered():
    """Issue 10, item 6: 70 Push, 10 InitShard and 10 unary calls that open and then send
    nothing, without a deadline of their own, end DEADLINE_EXCEEDED by the server's limits;
    meanwhile GetShardInfo is answered at once, and a new job starts within that limit."""
    server = harness.start("shardps-server", "--port", "0", "--coordinator", "")
    create_job(server)
    base = threads(server)
    release = threading.Event()

    def silent():
        release.wait()
        yield from ()

    channel = grpc.insecure_channel(server.address)
    stuck = []
    try:
        for method, count in (("Push", 70), ("InitShard", 10), ("GetShardInfo", 10)):
            call = channel.stream_unary(SERVICE + method, request_serializer=bytes,
                                        response_deserializer=bytes)
            stuck += [(method, call.future(silent())) for _ in range(count)]
        start = time.monotonic()
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        for _ in range(5):
            reply = stub.GetShardInfo(ps_pb2.GetShardInfoRequest(job_id=JOB), timeout=2)
            assert [s.job_id for s in reply.shards] == [JOB]
            time.sleep(0.5)
        create_job(server, job="newcomer")
        assert time.monotonic() - start < callguard.REQUEST_WAIT_S + 8
        for method, future in stuck:
            exc = future.exception(timeout=max(1.0, start + 2 * callguard.REQUEST_WAIT_S + 15 - time.monotonic()))
            assert exc is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (method, exc)
            assert f"within {callguard.REQUEST_WAIT_S:g} s" in exc.details(), exc.details()
        assert threads(server) <= base + 64 + 16
    finally:
        release.set()
        channel.close()
    assert server.proc.poll() is None, server.output()
    train_step(server)


def test_clients_that_stop_reading_a_pull_are_ended():
    """Found with item 6: a pull whose client stops reading its reply (over gRPC, or over the
    data plane) held a server thread and the shard's snapshot until the client's deadline (or
    300 s a piece); now for at most callguard.CLIENT_WAIT_S."""
    server = harness.start("shardps-server", "--port", "0", "--coordinator", "")
    big = 8 * 1024 * 1024  # 32 MiB of fp32: more than every buffer on the way
    create_job(server, job="big", total=big)
    request = ps_pb2.PullRequest(job_id="big", shard_index=0, dtype=common_pb2.DTYPE_FLOAT32)
    with rpc.make_channel(server.address) as channel:
        port = ps_pb2_grpc.ParameterServerStub(channel).GetDataPlane(
            ps_pb2.GetDataPlaneRequest(), timeout=5).port
        pull = channel.unary_stream(SERVICE + "Pull", request_serializer=ps_pb2.PullRequest.SerializeToString,
                                    response_deserializer=bytes)
        replies = pull(request, timeout=600)
        next(replies)  # the first chunk, then nothing more is read
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(dataplane.MAGIC + dataplane.TOKEN_LEN.pack(0))
            assert dataplane.recv_frame(sock)[0] == 0
            sock.sendall(dataplane.frame(dataplane.PULL, request.SerializeToString()))
            code, body = dataplane.recv_frame(sock)
            assert code == 0 and ps_pb2.PullResponse.FromString(body).length == big
            harness.poll(lambda: server.has_line("Pull from .* ended: no read of the reply stream"),
                         callguard.CLIENT_WAIT_S + 15, what="the gRPC pull ended")
            harness.poll(lambda: server.has_line("data connection from .* ended: a request waited"),
                         15, what="the data-plane pull ended")
            with pytest.raises(grpc.RpcError) as ended:
                for _ in replies:
                    pass
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The data-plane pull was cut short too: fewer bytes than announced.
            got = 0
            sock.settimeout(10)
            try:
                while chunk := sock.recv(1 << 20):
                    got += len(chunk)
            except ConnectionError:
                pass
            assert got < big * 4
    assert server.proc.poll() is None, server.output()


def test_half_sent_metrics_requests_cost_no_threads_and_scrapes_still_work():
    """Issue 10, item 9: 200 HTTP requests to a metrics port that never finish their headers
    hold no thread each, a normal scrape is answered meanwhile, and they are closed after
    the deadline."""
    server = harness.start("shardps-server", "--port", "0", "--coordinator", "", "--metrics-port", "0")
    url = f"http://{server.metrics_address}/metrics"
    assert b"shardps_ps" in urllib.request.urlopen(url, timeout=5).read()
    base = threads(server)
    host, port = server.metrics_address.rsplit(":", 1)
    half = []
    try:
        for _ in range(200):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            half.append(sock)
        time.sleep(1)
        assert threads(server) <= base + 4, f"{threads(server)} threads, {base} before"
        start = time.monotonic()
        assert b"shardps_ps" in urllib.request.urlopen(url, timeout=5).read()
        assert time.monotonic() - start < daemon_lib.HTTP_DEADLINE_S / 2  # not behind them
        time.sleep(3)
        assert threads(server) <= base + 4
        # None of them got an answer; each is closed by the deadline (or pushed out before).
        for sock in half:
            sock.settimeout(daemon_lib.HTTP_DEADLINE_S + 5)
            try:
                assert sock.recv(100) == b""
            except ConnectionError:
                pass
    finally:
        for sock in half:
            sock.close()
    assert server.proc.poll() is None, server.output()


def test_an_unauthenticated_client_cannot_hold_threads_with_calls_it_never_completes(tmp_path):
    """Found with items 2 and 6: calls without the token that open and send nothing are
    refused at once (UNAUTHENTICATED, without waiting for a request); health checks, which
    need no token, end within the first-message limit, on threads of their own."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    server = harness.start("shardps-server", "--port", "0", "--coordinator", "", "--token-file", str(token_file))
    release = threading.Event()

    def silent():
        release.wait()
        yield from ()

    channel = grpc.insecure_channel(server.address)
    try:
        start = time.monotonic()
        refused = [channel.stream_unary(SERVICE + method, request_serializer=bytes,
                                        response_deserializer=bytes).future(silent())
                   for method in ("GetShardInfo", "DropJob", "Push") for _ in range(40)]
        health = [channel.stream_unary("/grpc.health.v1.Health/Check", request_serializer=bytes,
                                       response_deserializer=bytes).future(silent())
                  for _ in range(rpc.HEALTH_WORKERS)]
        for future in refused:
            assert future.exception(timeout=5).code() == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - start < callguard.REQUEST_WAIT_S / 2  # not after a wait for a request
        rpc.configure(rpc.Security(token=TOKEN))
        try:
            with rpc.make_channel(server.address) as good:
                stub = ps_pb2_grpc.ParameterServerStub(good)
                assert stub.GetShardInfo(ps_pb2.GetShardInfoRequest(), timeout=2).shards == []
        finally:
            rpc.configure(rpc.Security())
        for future in health:
            exc = future.exception(timeout=callguard.REQUEST_WAIT_S + 10)
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
        channel.close()
    assert server.proc.poll() is None, server.output()

