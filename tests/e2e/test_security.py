"""Mutual TLS and the shared token, end to end with the real console scripts."""

import json
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.proto import common_pb2, dataplane, ps_pb2, ps_pb2_grpc
from shardps.psclient import connection
from shardps.runtime import rpc, sslcontext
from tests import harness

ROOT = Path(__file__).resolve().parents[2]
JOB = """
name: secured
model: {name: mlp}
data: {dataset: digits, batch_size: 64}
cluster: {servers: 1, workers: 1}
stop: {max_steps: 2000, target: {metric: accuracy, value: 0.96}, eval_every: 100}
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    done = harness.run_cli("certs", str(directory))
    assert done.returncode == 0, done.stderr
    assert oct((directory / "node-key.pem").stat().st_mode & 0o777) == "0o600"
    return directory


def flags(certs, role="node", token=True, ca=True, cert=True):
    out = []
    if cert:
        out += ["--tls-cert", str(certs / f"{role}.pem"), "--tls-key", str(certs / f"{role}-key.pem")]
    if ca:
        out += ["--tls-ca", str(certs / "ca.pem")]
    if token:
        out += ["--token-file", str(certs / "token")]
    return out


@pytest.fixture(scope="module")
def secured(certs):
    coord = harness.start("shardps-coordinator", "--port", "0", *flags(certs))
    server = harness.start("shardps-server", "--port", "0", "--coordinator", coord.address, *flags(certs))
    worker = harness.start("shardps-worker", "--port", "0", "--coordinator", coord.address,
                           "--threads", "1", *flags(certs))
    yield coord, server
    for d in (worker, server, coord):
        assert d.stop() == 0, d.output()


@pytest.fixture(autouse=True)
def _kill_leftover_daemons():
    """The module's cluster outlives each test."""
    yield


def cli(coord, certs, *args, **access):
    return harness.run_cli(*args, "--coordinator", coord.address, *flags(certs, "client", **access))


def job_count(coord, certs):
    out = cli(coord, certs, "status", "--output", "json")
    assert out.returncode == 0, out.stderr
    return len(json.loads(out.stdout))


@pytest.fixture(scope="module")
def trained(secured, certs):
    """The digits job, trained once on the module's cluster (in each test process that
    runs a test needing it: under xdist the tests of a module may land in different ones)."""
    coord, _ = secured
    return harness.run_cli("submit", "-", "--wait", "--coordinator", coord.address,
                           *flags(certs, "client"), input=JOB, timeout=300)


def test_a_secured_cluster_trains_digits(trained):
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "CONVERGED" in trained.stdout


def test_a_client_without_the_token_is_unauthenticated_and_changes_nothing(secured, certs):
    coord, _ = secured
    before = job_count(coord, certs)
    for args in (["status"], ["nodes"], ["submit", str(ROOT / "examples" / "digits.yaml")]):
        out = cli(coord, certs, *args, token=False)
        assert out.returncode == 1, out.stdout
        assert rpc.UNAUTHENTICATED_MESSAGE in out.stderr
    assert job_count(coord, certs) == before


def test_a_wrong_token_is_unauthenticated(secured, certs, tmp_path):
    coord, _ = secured
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token\n")
    out = harness.run_cli("status", "--coordinator", coord.address, *flags(certs, "client", token=False),
                          "--token-file", str(wrong))
    assert out.returncode == 1 and rpc.UNAUTHENTICATED_MESSAGE in out.stderr


@pytest.mark.parametrize("access", [{"ca": False, "cert": False}, {"cert": False}, {"ca": False}])
def test_a_client_without_a_trusted_certificate_cannot_connect(secured, certs, access):
    coord, _ = secured
    before = job_count(coord, certs)
    out = cli(coord, certs, "submit", str(ROOT / "examples" / "digits.yaml"), **access)
    assert out.returncode == 4, out.stdout + out.stderr  # unreachable: the handshake fails
    assert "not reachable" in out.stderr
    assert job_count(coord, certs) == before


def test_an_unauthenticated_push_leaves_the_weights_alone(secured, certs, trained):
    coord, server = secured
    assert trained.returncode == 0, trained.stdout + trained.stderr
    jobs = json.loads(cli(coord, certs, "status", "--output", "json").stdout)
    job_id = jobs[0]["job_id"]
    ca, cert, key = ((certs / n).read_bytes() for n in ("ca.pem", "client.pem", "client-key.pem"))
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(server.address, creds) as channel:  # TLS but no token
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        header = ps_pb2.PushHeader(job_id=job_id, shard_index=0, worker_id="intruder", step=10**6,
                                   dtype=common_pb2.DTYPE_FLOAT32, batch_size=1, length=1)
        with pytest.raises(grpc.RpcError) as info:
            stub.Push(iter([ps_pb2.PushRequest(header=header)]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            stub.GetShardInfo(ps_pb2.GetShardInfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health checks stay open to load balancers and orchestrators.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    rpc.configure(rpc.Security(ca=ca, cert=cert, key=key, token=(certs / "token").read_text().strip()))
    try:
        with rpc.make_channel(server.address) as channel:
            info = ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
                ps_pb2.GetShardInfoRequest(job_id=job_id), timeout=10)
    finally:
        rpc.configure(rpc.Security())
    assert info.shards and "intruder" not in info.shards[0].worker_clocks


def test_the_data_plane_needs_tls_a_client_certificate_and_the_token(secured, certs):
    coord, server = secured
    ca, cert, key = ((certs / n).read_bytes() for n in ("ca.pem", "client.pem", "client-key.pem"))
    token = (certs / "token").read_text().strip()
    full = rpc.Security(ca=ca, cert=cert, key=key, token=token)
    rpc.configure(full)
    try:
        with rpc.make_channel(server.address) as channel:
            port = ps_pb2_grpc.ParameterServerStub(channel).GetDataPlane(
                ps_pb2.GetDataPlaneRequest(), timeout=10).port
    finally:
        rpc.configure(rpc.Security())
    host = server.address.rsplit(":", 1)[0]
    refused = [(None, token, grpc.StatusCode.UNAVAILABLE),  # plain TCP to a TLS port
               (rpc.Security(ca=ca), token, grpc.StatusCode.UNAVAILABLE),  # no client certificate
               (full, None, grpc.StatusCode.UNAUTHENTICATED),
               (full, "not-the-token", grpc.StatusCode.UNAUTHENTICATED)]
    for security, sent_token, code in refused:
        context = sslcontext.client_context(security) if security else None
        with pytest.raises(dataplane.DataPlaneError) as info:
            connection.Connection(host, port, context, sent_token)
        assert info.value.code() == code, (security, sent_token)
    conn = connection.Connection(host, port, sslcontext.client_context(full), token)
    request = ps_pb2.PullRequest(job_id="no-such-job", dtype=common_pb2.DTYPE_FLOAT32)
    with pytest.raises(dataplane.DataPlaneError) as info:  # through: the server answers
        conn.pull(request, torch.empty(1), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    conn.close()
