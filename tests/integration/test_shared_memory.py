"""The data plane's same-host path (proto/dataplane.py, "shared memory"; runtime/shm.py):
pushes and pulls between loopback addresses move their elements through a segment in
/dev/shm, bitwise as over the socket; offered only on loopback and never by `--shared-memory
off`; bad requests refused with gRPC codes; no file left in /dev/shm, also after a kill."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import grpc
import pytest
import torch

from shardps.proto import common_pb2, dataplane, ps_pb2
from shardps.psclient import PSClient, connection
from shardps.runtime import shm
from tests.harness import poll
from tests.integration.test_dataplane import started
from tests.integration.test_ps import SYNC, reference_adam, shard_config, shard_map

pytestmark = pytest.mark.timeout(120)

TOTAL = 300_000  # two shards of 150K elements: a pull lands in a few LANDED frames of 1M each
BUCKETS = [(0, 40_000), (40_000, 180_000), (180_000, TOTAL)]
F32, BF16 = common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16


def _sample(server, name: str, **labels: str) -> float:
    return sum(s.value for m in server.metrics_registry.collect() for s in m.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _segment_files() -> list[str]:
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"{shm.PREFIX}{os.getpid()}-"))


def _train(server, dtype: int) -> list[torch.Tensor]:
    """Three sync steps against `server` (two shards): a push with the next pull sent
    behind it, an overlapped push in pieces with an overlapped pull, and a plain push and
    pull in `dtype`; every pulled copy of the weights."""
    gen = torch.Generator().manual_seed(7)
    init = torch.randn(TOTAL, generator=gen)
    grads = [torch.randn(TOTAL, generator=gen) for _ in range(3)]
    pulled = []
    with PSClient("job", shard_map([server, server], TOTAL), worker_id="w0") as client:
        client.init(init, shard_config(SYNC))
        dest = torch.empty(TOTAL)
        client.push(grads[0], step=0, base_version=0, batch_size=1,
                    then_pull={"min_version": 1, "timeout_s": 10})
        assert client.pull(dest, min_version=1, timeout_s=10).ready
        pulled.append(dest.clone())
        push = client.begin_push(grads[1], step=1, base_version=1, batch_size=1, buckets=BUCKETS)
        for bucket in (2, 1, 0):  # as backward finishes them
            push.ready(bucket)
        assert all(r.status == ps_pb2.PUSH_STATUS_APPLIED for r in push.finish())
        inflight = client.start_pull(dest, min_version=2, timeout_s=10)
        assert inflight.heads()[0]
        inflight.wait(0, 10)
        inflight.finish()
        pulled.append(dest.clone())
    with PSClient("job", shard_map([server, server], TOTAL), worker_id="w0", dtype=dtype) as client:
        client.push(grads[2], step=2, base_version=2, batch_size=1)
        wire = torch.empty(TOTAL, dtype=codec_dtype(dtype))
        assert client.pull(wire, min_version=3, timeout_s=10).ready
        pulled.append(wire.clone())
    assert torch.equal(pulled[1], reference_adam(init, grads[:2]))
    return pulled


def codec_dtype(dtype: int) -> torch.dtype:
    return torch.bfloat16 if dtype == BF16 else torch.float32


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_the_same_host_path_trains_bitwise_as_the_socket_and_leaves_no_file(dtype):
    on, off = started(), started(shared_memory=False)
    try:
        via_shm, via_socket = _train(on, dtype), _train(off, dtype)
        assert all(torch.equal(a, b) for a, b in zip(via_shm, via_socket, strict=True))
        for direction in ("push", "pull"):
            assert _sample(on, "shardps_ps_shared_memory_bytes_total", direction=direction) > 0
            assert _sample(off, "shardps_ps_shared_memory_bytes_total", direction=direction) == 0
        # Every segment was unlinked once mapped, and unmapped with its connection.
        assert _segment_files() == []
        poll(lambda: _sample(on, "shardps_ps_shared_memory_segments") == 0, 10,
             what="the closed connections' segments released")
        assert _sample(on, "shardps_ps_shared_memory_segment_bytes") == 0
    finally:
        on.stop(0)
        off.stop(0)


def _hello(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(dataplane.MAGIC + dataplane.TOKEN_LEN.pack(0))
    assert dataplane.recv_frame(sock) == (0, b"")  # as without shared memory
    return sock


def _ask(sock: socket.socket, kind: int, body: bytes) -> tuple[int, bytes]:
    sock.sendall(dataplane.frame(kind, body))
    return dataplane.recv_frame(sock)


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(10)
    return sock.recv(1) == b""


def test_shared_memory_is_offered_on_loopback_unless_off_and_bad_requests_are_refused():
    server, off = started(), started(shared_memory=False)
    try:
        with PSClient("job", shard_map([server], 1000), worker_id="w0") as client:
            client.init(torch.zeros(1000), shard_config(SYNC))
        sock = _hello(off.data_port)  # not offered: declined, and the other kinds unknown
        assert _ask(sock, dataplane.SHM_OPEN, dataplane.CAPACITY.pack(4000)) == (0, b"")
        code, message = _ask(sock, dataplane.SHM_CONFIRM, b"\1")
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and b"unknown request kind" in message
        assert _closed(sock)
        # Over the largest shard (1000 fp32 elements here): declined, the connection kept.
        sock = _hello(server.data_port)
        assert _ask(sock, dataplane.SHM_OPEN, dataplane.CAPACITY.pack(4001)) == (0, b"")
        code, body = _ask(sock, dataplane.SHM_OPEN, dataplane.CAPACITY.pack(4000))
        assert code == 0 and len(body) > shm.NONCE_BYTES
        path = body[shm.NONCE_BYTES :].decode()
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert _ask(sock, dataplane.SHM_CONFIRM, b"\0") == (0, b"")  # not mapped: dropped
        assert not os.path.exists(path)
        # A push whose elements would be in a segment the connection does not have.
        header = ps_pb2.PushHeader(job_id="job", shard_index=0, worker_id="w0", step=0,
                                   dtype=F32, batch_size=1, length=1000)
        code, message = _ask(sock, dataplane.PUSH_SHM, header.SerializeToString())
        assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert b"no shared-memory segment" in message and _closed(sock)
        sock = _hello(server.data_port)
        code, _ = _ask(sock, dataplane.SHM_CONFIRM, b"\1")  # nothing offered
        assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and _closed(sock)
        sock = _hello(server.data_port)
        code, _ = _ask(sock, dataplane.SHM_OPEN, b"\1\2")  # not a u64
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and _closed(sock)
        assert server.shards.shards("job")[0].version == 0  # nothing applied
        assert _segment_files() == []
    finally:
        server.stop(0)
        off.stop(0)


def test_a_pull_behind_a_push_that_sized_the_segment_smaller_comes_on_the_socket():
    """A bf16 push sizes the segment for 2 bytes an element; the fp32 pull sent behind it
    does not fit, so the server says ON_SOCKET and sends the elements there."""
    server = started()
    try:
        init, grad = torch.randn(1000), torch.randn(1000)
        with PSClient("job", shard_map([server], 1000), worker_id="w0") as client:
            client.init(init, shard_config(SYNC))
        conn = connection.Connection("127.0.0.1", server.data_port, None, None)
        header = ps_pb2.PushHeader(job_id="job", shard_index=0, worker_id="w0", step=0,
                                   dtype=BF16, batch_size=1, length=1000)
        conn.start_push(header, grad, BF16, 10)
        request = ps_pb2.PullRequest(job_id="job", shard_index=0, dtype=F32, min_version=1,
                                     timeout_ms=5000)
        conn.start_pull(request, 10, behind=True)
        assert conn.finish_push(10).status == ps_pb2.PUSH_STATUS_APPLIED
        dest = torch.empty(1000)
        assert conn.finish_pull(request, dest, 10).ready
        conn.close()
        assert torch.equal(dest, reference_adam(init, [grad.bfloat16().float()]))
        assert _sample(server, "shardps_ps_shared_memory_bytes_total", direction="push") == 2000
        assert _sample(server, "shardps_ps_shared_memory_bytes_total", direction="pull") == 0
    finally:
        server.stop(0)


def test_segments_of_a_process_that_is_gone_are_removed_when_a_server_starts():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=30)
    left = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{int(gone.stdout)}-0123456789abcdef")
    ours = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{os.getpid()}-fedcba9876543210")
    for path in (left, ours):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        started(shared_memory=False).stop(0)  # off: leaves /dev/shm alone
        assert os.path.exists(left)
        started().stop(0)
        assert not os.path.exists(left)
        assert os.path.exists(ours)  # its process is alive
    finally:
        for path in (left, ours):
            if os.path.exists(path):
                os.unlink(path)


def _outside_address() -> str | None:
    """One of this machine's IPv4 addresses that is not loopback, if it has one."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True,
                         timeout=10).stdout
    for line in out.splitlines():
        address = line.split()[3].split("/")[0]
        if not address.startswith("127."):
            return address
    return None


def test_a_connection_between_addresses_that_are_not_loopback_is_not_offered_it():
    """Hosts that are network namespaces of one machine (bench.net) see the same /dev/shm:
    only loopback marks a peer as reachable through it."""
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    server = started(host="0.0.0.0")
    try:
        with PSClient("job", shard_map([server], 1000), worker_id="w0") as client:
            client.init(torch.zeros(1000), shard_config(SYNC))
        ask = dataplane.CAPACITY.pack(4000)
        sock = _hello(server.data_port, address)
        assert _ask(sock, dataplane.SHM_OPEN, ask) == (0, b"")
        sock.close()
        sock = _hello(server.data_port, "127.0.0.1")
        code, body = _ask(sock, dataplane.SHM_OPEN, ask)
        assert code == 0 and len(body) > shm.NONCE_BYTES
        assert _ask(sock, dataplane.SHM_CONFIRM, b"\0") == (0, b"")
        sock.close()
    finally:
        server.stop(0)


def test_a_servers_segments_stay_within_four_times_its_shards_and_the_rest_use_the_socket():
    server = started()
    socks: list[socket.socket] = []
    try:
        with PSClient("job", shard_map([server], 1000), worker_id="w0") as client:
            client.init(torch.zeros(1000), shard_config(SYNC))
        ask = dataplane.CAPACITY.pack(4000)  # the shard's 1000 fp32 elements: a budget of 4
        for _ in range(4):
            socks.append(_hello(server.data_port))
            code, body = _ask(socks[-1], dataplane.SHM_OPEN, ask)
            assert code == 0 and len(body) > shm.NONCE_BYTES
            assert _ask(socks[-1], dataplane.SHM_CONFIRM, b"\1") == (0, b"")
        assert _sample(server, "shardps_ps_shared_memory_segment_bytes") == 16_000
        fifth = _hello(server.data_port)
        assert _ask(fifth, dataplane.SHM_OPEN, ask) == (0, b"")  # declined; the socket still serves
        request = ps_pb2.PullRequest(job_id="job", shard_index=0, dtype=F32, timeout_ms=1000)
        fifth.sendall(dataplane.frame(dataplane.PULL, request.SerializeToString()))
        code, head = dataplane.recv_frame(fifth)
        assert code == 0 and ps_pb2.PullResponse.FromString(head).length == 1000
        dataplane.recv_exact(fifth, memoryview(bytearray(4000)))
        socks.pop().close()  # one connection goes: its segment's bytes come back
        poll(lambda: _sample(server, "shardps_ps_shared_memory_segment_bytes") == 12_000, 10,
             what="the closed connection's segment given back")
        code, body = _ask(fifth, dataplane.SHM_OPEN, ask)
        assert code == 0 and len(body) > shm.NONCE_BYTES
        socks.append(fifth)
    finally:
        for sock in socks:
            sock.close()
        server.stop(0)
    poll(lambda: _segment_files() == [], 10, what="the offered segment's file removed")
