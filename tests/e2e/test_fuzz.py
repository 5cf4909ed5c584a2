"""Hostile input: thousands of malformed and random requests to live daemons.

Every request gets an answer (a status, never a hang), no handler crashes (no UNKNOWN), the
daemons stay up and healthy, and neither the job table nor a shard's weights change.
"""

import math
import random
import socket
import struct
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.proto import common_pb2, compress, coordinator_pb2, dataplane, names, ps_pb2, ps_pb2_grpc, spec
from shardps.psclient import PSClient
from shardps.runtime import rpc
from tests import harness

SEED = 20261128
REQUESTS_PER_DAEMON = 1500
DATA_PLANE_CONNECTIONS = 400
BUDGET_S = 120.0  # the loops stop by themselves after this, whatever the count reached
DEADLINE_S = 5.0
# An answer with one of these is a handled outcome; UNKNOWN means a handler crashed, and
# UNAVAILABLE / DEADLINE_EXCEEDED that the daemon died or hung.
HANDLED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.CANCELLED}
# Bytes the server cannot even parse are a bad request like any other: INVALID_ARGUMENT, not
# INTERNAL (issue 10, item 9).
UNPARSABLE: set = set()

TOTAL = 4096
JOB = "fuzzed"
WORKER = "worker-real"


def random_message(cls, rng: random.Random, depth: int = 0):
    """A message of type cls with random values in random fields (nested up to depth 3)."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        count = rng.randint(0, 3) if field.is_repeated else 1
        for _ in range(count):
            value = _random_value(field, rng, depth)
            if value is None:
                continue
            if field.is_repeated:
                if field.message_type is not None and not field.message_type.GetOptions().map_entry:
                    getattr(msg, field.name).add().CopyFrom(value)
                elif field.message_type is None:
                    getattr(msg, field.name).append(value)
            elif field.message_type is not None:
                getattr(msg, field.name).CopyFrom(value)
            else:
                setattr(msg, field.name, value)
    return msg


def _random_value(field, rng, depth):
    t = field.type
    if field.message_type is not None:
        if depth >= 3 or field.message_type.GetOptions().map_entry:
            return None
        from google.protobuf import message_factory
        return random_message(message_factory.GetMessageClass(field.message_type), rng, depth + 1)
    if t in (field.TYPE_INT64, field.TYPE_INT32, field.TYPE_SINT64, field.TYPE_SINT32):
        bits = 31 if t in (field.TYPE_INT32, field.TYPE_SINT32) else 63
        return rng.choice([0, 1, -1, 2**bits - 1, -(2**bits), rng.randint(-(2**bits), 2**bits - 1)])
    if t in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        return rng.choice([0.0, -1.0, math.inf, -math.inf, math.nan, 1e308, rng.uniform(-1e6, 1e6)])
    if t == field.TYPE_BOOL:
        return rng.random() < 0.5
    if t == field.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99, -5])
    if t == field.TYPE_STRING:
        return rng.choice(["", JOB, WORKER, "x" * rng.randint(1, 5000),
                           "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(1, 40)))])
    if t == field.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 3, 4, 7, 64, 4096]))
    return None


def call(channel, method: str, request, request_stream=False, response_stream=False):
    """Sends one request (serialised message or raw bytes); returns the status code."""
    serialize = (lambda b: b) if isinstance(request, bytes) or (request_stream and isinstance(request[0], bytes)) \
        else (lambda m: m.SerializeToString())
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    rpc_call = kind[(request_stream, response_stream)](method, request_serializer=serialize,
                                                       response_deserializer=lambda b: b)
    try:
        result = rpc_call(iter(request) if request_stream else request, timeout=DEADLINE_S)
        if response_stream:
            for _ in result:
                pass
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def assert_healthy(address):
    with rpc.make_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def check(codes: dict, method: str, code: grpc.StatusCode, raw: bool) -> None:
    allowed = HANDLED | (UNPARSABLE if raw else set())
    assert code in allowed, f"{method}: {code} (raw={raw})"
    codes[code] = codes.get(code, 0) + 1


@pytest.fixture
def server():
    return harness.start("shardps-server", "--port", "0", "--coordinator", "")


def fuzzed_job(server) -> tuple[common_pb2.ShardMap, ps_pb2.ShardConfig]:
    """Creates the job under fire on the server (async, one worker); its map and config."""
    shard_map = common_pb2.ShardMap(version=1, shards=[common_pb2.ShardRange(
        index=0, server_id="s", address=server.address, offset=0, length=TOTAL)])
    config = ps_pb2.ShardConfig(optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9,
                                beta2=0.999, eps=1e-8), mode=common_pb2.CONSISTENCY_ASYNC,
                                workers=[WORKER], epoch=1)
    with PSClient(JOB, shard_map) as ps:
        ps.init(torch.randn(TOTAL, generator=torch.Generator().manual_seed(0)), config)
    return shard_map, config


def weights(server) -> tuple[torch.Tensor, list[int]]:
    shard_map = common_pb2.ShardMap(version=1, shards=[common_pb2.ShardRange(
        index=0, server_id="s", address=server.address, offset=0, length=TOTAL)])
    flat = torch.empty(TOTAL)
    with PSClient(JOB, shard_map) as ps:
        result = ps.pull(flat, timeout_s=10)
    return flat, result.versions


def test_parameter_server_survives_hostile_input_with_weights_unchanged(server):
    shard_map, config = fuzzed_job(server)
    before, versions = weights(server)

    rng = random.Random(SEED)
    codes: dict = {}
    base = "/shardps.v1.ParameterServer/"
    start = time.monotonic()
    with rpc.make_channel(server.address) as channel:
        for i in range(REQUESTS_PER_DAEMON):
            if time.monotonic() - start > BUDGET_S:
                break
            case = i % 6
            if case == 0:  # garbage bytes to every method
                method, streams = rng.choice([("Push", (True, False)), ("Pull", (False, True)),
                                              ("InitShard", (True, False)), ("GetShardInfo", (False, False)),
                                              ("DropJob", (False, False))])
                body = rng.randbytes(rng.randint(0, 300))
                req = [body] * rng.randint(1, 3) if streams[0] else body
                code = call(channel, base + method, req, *streams)
                check(codes, method, code, raw=True)
                continue
            if case == 1:  # random pushes: random headers and chunks, truncated or not
                msgs = [ps_pb2.PushRequest(header=random_message(ps_pb2.PushHeader, rng))]
                msgs += [random_message(ps_pb2.PushRequest, rng) for _ in range(rng.randint(0, 4))]
                check(codes, "Push", call(channel, base + "Push", msgs, True, False), raw=False)
            elif case == 2:  # plausible pushes for the real job that are wrong in one way
                check(codes, "Push", call(channel, base + "Push", bad_push(rng), True, False), raw=False)
            elif case == 3:  # random pulls (bounded waits)
                req = random_message(ps_pb2.PullRequest, rng)
                req.timeout_ms = rng.choice([0, 1, 10])
                check(codes, "Pull", call(channel, base + "Pull", req, False, True), raw=False)
            elif case == 4:  # InitShard for the real job with broken chunks must not replace it
                check(codes, "InitShard", call(channel, base + "InitShard", bad_init(rng, config), True, False),
                      raw=False)
            else:
                method = rng.choice(["GetShardInfo", "DropJob"])
                cls = ps_pb2.GetShardInfoRequest if method == "GetShardInfo" else ps_pb2.DropJobRequest
                req = random_message(cls, rng)
                if method == "DropJob" and req.job_id == JOB:
                    req.job_id = JOB + "-other"
                check(codes, method, call(channel, base + method, req), raw=False)
    assert sum(codes.values()) >= 1000, codes
    assert len(codes) >= 4, codes  # the cases reach different checks, not one early exit
    # A message over the size limit is refused before it is read into memory.
    huge = ps_pb2.PushRequest(chunk=common_pb2.TensorChunk(offset=0, data=bytes(rpc.MAX_MESSAGE_BYTES + 1024)))
    unlimited = [("grpc.max_send_message_length", -1)]  # so the server, not the client, refuses
    with grpc.insecure_channel(server.address, options=unlimited) as channel:
        assert call(channel, base + "Push", [huge], True, False) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.proc.poll() is None, server.output()
    assert_healthy(server.address)
    after, versions_after = weights(server)
    assert torch.equal(after, before) and versions_after == versions
    # ...and it still does its job: a valid push applies.
    with PSClient(JOB, shard_map, worker_id=WORKER) as ps:
        replies = ps.push(torch.ones(TOTAL), step=0, base_version=versions[0], batch_size=1)
    assert replies[0].status == ps_pb2.PUSH_STATUS_APPLIED


def test_data_plane_survives_hostile_input_with_weights_unchanged(server):
    """Raw bytes, bad hellos, oversized and truncated frames, wrong pushes and random pulls on
    the data plane's TCP port: every request gets a refusal with a gRPC code or a closed
    connection within the deadline, the server stays up and the weights do not change."""
    shard_map, config = fuzzed_job(server)
    before, versions = weights(server)
    with rpc.make_channel(server.address) as channel:
        port = ps_pb2_grpc.ParameterServerStub(channel).GetDataPlane(
            ps_pb2.GetDataPlaneRequest(), timeout=DEADLINE_S).port
    assert port > 0
    hello = dataplane.MAGIC + dataplane.TOKEN_LEN.pack(0)
    rng = random.Random(SEED + 1)
    outcomes: dict = {}
    start = time.monotonic()
    for i in range(DATA_PLANE_CONNECTIONS):
        if time.monotonic() - start > BUDGET_S:
            break
        case = i % 5
        if case == 0:  # garbage instead of a hello
            sent = rng.randbytes(rng.randint(0, 64))
        elif case == 1:  # a hello, then garbage frames
            sent = hello + rng.randbytes(rng.randint(0, 200))
        elif case == 2:  # a frame claiming a huge body
            sent = hello + dataplane.FRAME.pack(rng.choice([1, 2, 9]), rng.choice([2**32 - 1, 10**6]))
        elif case == 3:  # plausible pushes that are wrong in one way
            header, payload = bad_data_push(rng)
            sent = hello + dataplane.frame(dataplane.PUSH, header) + payload
        else:  # random pulls (bounded waits)
            req = random_message(ps_pb2.PullRequest, rng)
            req.timeout_ms = rng.choice([0, 1, 10])
            sent = hello + dataplane.frame(dataplane.PULL, req.SerializeToString())
        for outcome in exchange(port, sent):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert sum(outcomes.values()) >= 200, outcomes
    assert all(o in {"closed", "OK"} or grpc.StatusCode[o] in HANDLED for o in outcomes), outcomes
    assert "INVALID_ARGUMENT" in outcomes and "closed" in outcomes, outcomes
    assert server.proc.poll() is None, server.output()
    assert_healthy(server.address)
    after, versions_after = weights(server)
    assert torch.equal(after, before) and versions_after == versions
    with PSClient(JOB, shard_map, worker_id=WORKER) as ps:  # and a valid push still applies
        replies = ps.push(torch.ones(TOTAL), step=0, base_version=versions[0], batch_size=1)
    assert replies[0].status == ps_pb2.PUSH_STATUS_APPLIED


def exchange(port: int, sent: bytes) -> list[str]:
    """Sends `sent` on a new connection, half-closes it and reads every reply frame until the
    server closes; returns their codes' names (and "closed"). Fails if it takes too long."""
    outcomes = []
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        try:
            sock.sendall(sent)
            sock.shutdown(socket.SHUT_WR)
            while True:
                code, body = dataplane.recv_frame(sock)
                outcomes.append(grpc.StatusCode.OK.name if code == 0 else dataplane.status_code(code).name)
                if code == 0 and body:  # a pull head: skip the elements of a ready one
                    head = ps_pb2.PullResponse.FromString(body)
                    if head.ready:
                        dataplane.recv_exact(sock, memoryview(bytearray(head.length * 4)))
        except TimeoutError:
            raise AssertionError(f"no answer within {DEADLINE_S} s to {sent[:40]!r}") from None
        except OSError:  # closed by the server (a reset, when it closed with our bytes unread)
            outcomes.append("closed")
    return outcomes


HEADER_FAULTS = ("dtype", "length", "worker", "shard")


def real_header(rng) -> ps_pb2.PushHeader:
    """A push header for the fuzzed job that a server would accept."""
    return ps_pb2.PushHeader(job_id=JOB, shard_index=0, worker_id=WORKER, incarnation=0,
                             step=rng.randint(0, 10**6), dtype=common_pb2.DTYPE_FLOAT32,
                             batch_size=1, length=TOTAL)


def break_header(header: ps_pb2.PushHeader, fault: str, rng) -> None:
    """Makes the header wrong in the one way `fault` (of HEADER_FAULTS) names."""
    if fault == "dtype":
        header.dtype = rng.choice([0, 7, -1])
    elif fault == "length":
        header.length = rng.choice([0, -1, TOTAL + 1, 2**40])
    elif fault == "worker":
        header.worker_id = "worker-intruder"
    else:
        header.shard_index = rng.choice([-1, 1, 2**31 - 1])


def with_bad_value(data: bytes, rng, value: float) -> bytes:
    bad = bytearray(data)
    at = rng.randrange(TOTAL) * 4
    bad[at:at + 4] = struct.pack("<f", value)
    return bytes(bad)


COMPRESSED_FAULTS = ("truncated", "nan_scale", "wrong_codec", "wrong_numel", "unknown", "huge")


def bad_compressed(rng) -> tuple[ps_pb2.PushHeader, bytes]:
    """A compressed push (int8) that is wrong in one way: its body a byte short, a NaN scale,
    the header naming another codec or declaring an unknown one or an absurd size, or an
    encoding of another number of elements. Never a valid one: it would change the weights."""
    header = real_header(rng)
    body = compress.Int8().encode(torch.ones(TOTAL))
    fault = rng.choice(COMPRESSED_FAULTS)
    compression = ps_pb2.PUSH_COMPRESSION_INT8
    if fault == "truncated":
        body = body[: rng.randrange(16, len(body))]
    elif fault == "nan_scale":
        at = 16 + 4 * rng.randrange(TOTAL // 256)
        body = body[:at] + struct.pack("<f", math.nan) + body[at + 4:]
    elif fault == "wrong_codec":
        compression = rng.choice([ps_pb2.PUSH_COMPRESSION_TOPK, ps_pb2.PUSH_COMPRESSION_SIGN])
    elif fault == "wrong_numel":
        body = compress.Int8().encode(torch.ones(TOTAL - rng.randint(1, 100)))
    header.compression = compression if fault != "unknown" else rng.choice([4, 99, -1])
    header.compressed_bytes = len(body) if fault != "huge" else rng.choice([2**40, 2**62])
    return header, body


def bad_data_push(rng) -> tuple[bytes, bytes]:
    header = real_header(rng)
    payload = struct.pack(f"<{TOTAL}f", *([1.0] * TOTAL))
    fault = rng.choice(["short", "nan", "garbage_header", "compressed", *HEADER_FAULTS])
    if fault == "compressed":
        header, payload = bad_compressed(rng)
    elif fault == "short":
        payload = payload[: rng.randrange(0, len(payload), 4)]
    elif fault == "nan":
        payload = with_bad_value(payload, rng, math.nan)
    elif fault == "garbage_header":
        return rng.randbytes(rng.randint(1, 40)), payload
    else:
        break_header(header, fault, rng)
    return header.SerializeToString(), payload


def bad_push(rng):
    header = real_header(rng)
    data = struct.pack(f"<{TOTAL}f", *([1.0] * TOTAL))
    fault = rng.choice(["short", "long", "nan", "inf", "offset", "odd_bytes", "no_header", "empty",
                        "compressed", *HEADER_FAULTS])
    chunks = [common_pb2.TensorChunk(offset=0, data=data)]
    if fault == "compressed":
        header, body = bad_compressed(rng)
        chunks = [common_pb2.TensorChunk(offset=0, data=body)]
    elif fault == "short":
        chunks = [common_pb2.TensorChunk(offset=0, data=data[: rng.randrange(0, len(data), 4)])]
    elif fault == "long":
        chunks.append(common_pb2.TensorChunk(offset=TOTAL, data=data[:64]))
    elif fault in ("nan", "inf"):
        bad = with_bad_value(data, rng, math.nan if fault == "nan" else math.inf)
        chunks = [common_pb2.TensorChunk(offset=0, data=bad)]
    elif fault == "offset":
        chunks = [common_pb2.TensorChunk(offset=rng.choice([-1, 1, TOTAL, 2**40]), data=data)]
    elif fault == "odd_bytes":
        chunks = [common_pb2.TensorChunk(offset=0, data=data[:-1])]
    elif fault == "empty":
        chunks = []
    elif fault in HEADER_FAULTS:
        break_header(header, fault, rng)
    msgs = [] if fault == "no_header" else [ps_pb2.PushRequest(header=header)]
    return msgs + [ps_pb2.PushRequest(chunk=c) for c in chunks]


def bad_init(rng, config):
    cfg = ps_pb2.ShardConfig()
    cfg.CopyFrom(config)
    cfg.job_id, cfg.shard_index, cfg.offset, cfg.length, cfg.total = JOB, 0, 0, TOTAL, TOTAL
    data = struct.pack(f"<{TOTAL}f", *([0.5] * TOTAL))
    fault = rng.choice(["short", "nan", "length", "lr", "mode", "offsets"])
    chunks = [common_pb2.TensorChunk(offset=0, data=data)]
    if fault == "short":
        chunks = [common_pb2.TensorChunk(offset=0, data=data[:400])]
    elif fault == "nan":
        chunks = [common_pb2.TensorChunk(offset=0, data=struct.pack("<f", math.nan) + data[4:])]
    elif fault == "length":
        cfg.length = rng.choice([-5, 2**40])
    elif fault == "lr":
        cfg.optimizer.lr = rng.choice([-1.0, math.nan, math.inf])
    elif fault == "mode":
        cfg.mode = 42
    else:
        chunks = [common_pb2.TensorChunk(offset=8, data=data)]
    return [ps_pb2.InitShardRequest(config=cfg, dtype=common_pb2.DTYPE_FLOAT32)] + \
        [ps_pb2.InitShardRequest(chunk=c) for c in chunks]


def test_coordinator_survives_hostile_input_with_its_job_table_unchanged():
    coord = harness.start("shardps-coordinator", "--port", "0")

    with rpc.make_channel(coord.address) as channel:
        base = "/shardps.v1.Coordinator/"
        submit = coordinator_pb2.SubmitJobRequest(spec_yaml="model: {name: mlp}\ndata: {dataset: digits}\n"
                                                  "stop: {max_steps: 5}\n")
        assert call(channel, base + "SubmitJob", submit) == grpc.StatusCode.OK
        jobs_before = call_list_jobs(channel)
        methods = {
            "RegisterNode": coordinator_pb2.RegisterNodeRequest, "Heartbeat": coordinator_pb2.HeartbeatRequest,
            "SubmitJob": coordinator_pb2.SubmitJobRequest, "GetJob": coordinator_pb2.GetJobRequest,
            "ListJobs": coordinator_pb2.ListJobsRequest, "CancelJob": coordinator_pb2.CancelJobRequest,
            "ListNodes": coordinator_pb2.ListNodesRequest, "SetLayout": coordinator_pb2.SetLayoutRequest,
            "ActivateJob": coordinator_pb2.ActivateJobRequest,
            "ReportProgress": coordinator_pb2.ReportProgressRequest,
            "Reshard": coordinator_pb2.ReshardRequest,
        }
        rng = random.Random(SEED + 1)
        codes: dict = {}
        start = time.monotonic()
        for i in range(REQUESTS_PER_DAEMON):
            if time.monotonic() - start > BUDGET_S:
                break
            method = rng.choice(sorted(methods))
            if i % 3 == 0:
                check(codes, method, call(channel, base + method, rng.randbytes(rng.randint(0, 200))), raw=True)
                continue
            req = random_message(methods[method], rng)
            if method == "SubmitJob" and i % 2:
                req.spec_yaml = mutate_spec(rng)
            if method == "SubmitJob" and _valid(req.spec_yaml):
                continue  # a valid spec is a legitimate job, not hostile input
            if method == "CancelJob" and req.job_id in {j for j in jobs_before}:
                continue
            check(codes, method, call(channel, base + method, req), raw=False)
        assert sum(codes.values()) >= 900, codes
        assert coord.proc.poll() is None, coord.output()
        assert_healthy(coord.address)
        assert call_list_jobs(channel) == jobs_before



def call_list_jobs(channel) -> dict[str, int]:
    stub = channel.unary_unary("/shardps.v1.Coordinator/ListJobs",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=coordinator_pb2.ListJobsResponse.FromString)
    reply = stub(coordinator_pb2.ListJobsRequest(), timeout=DEADLINE_S)
    return {j.job_id: j.state for j in reply.jobs}


def mutate_spec(rng) -> str:
    lines = ["model: {name: mlp}", "data: {dataset: digits, batch_size: 64}", "stop: {max_steps: 5}",
             "optimizer: {lr: 0.001}", "cluster: {servers: 1, workers: 1}"]
    junk = ["optimizer: {lr: -1}", "cluster: {servers: 0}", "bogus: 1", "model: {name: ../../etc/passwd}",
            "data: {dataset: digits, batch_size: 1e99}", "stop: {}", "model: !!python/object:os.system ls",
            "transport: {dtype: int8}", "consistency: {mode: sync, staleness: -3}", "- a\n- list", ": : :",
            "name: " + "x" * 5000]
    picked = rng.sample(lines, rng.randint(0, len(lines)))
    picked.insert(rng.randint(0, len(picked)), rng.choice(junk))
    return "\n".join(picked) + "\n"


def _valid(text: str) -> bool:
    try:
        spec.parse_spec(text)
        return True
    except spec.SpecError:
        return False


# -- issue 10: specs and pushes that once got through ------------------------------------------

# The documented limits (shardps.proto.spec, codec.MAX_GRADIENT), spelled out so that these
# tests also run, and fail, against a version without them.
SPEC_LIMITS = {"bytes": 64 * 1024, "depth": 32, "values": 4096, "message": 300, "steps": 2**31 - 1}
MAX_GRADIENT = 2.0**63
# Every number of the spec, with the edges of its range: (key, lowest, highest, kind).
NUMBERS = [
    ("seed", 0, 2**63 - 1, int), ("data.batch_size", 1, 2**20, int),
    ("optimizer.lr", 1e-30, 3.4028234663852886e38, float), ("optimizer.eps", 1e-30, 3.4e38, float),
    ("optimizer.weight_decay", 0.0, 1e3, float), ("optimizer.clip_grad_norm", 0.0, 3.4e38, float),
    ("optimizer.schedule.warmup_steps", 0, 2**31 - 1, int), ("optimizer.schedule.total_steps", 0, 2**31 - 1, int),
    ("cluster.servers", 1, 1024, int), ("cluster.workers", 1, 4096, int),
    ("transport.chunk_bytes", 4096, 16 * 1024 * 1024, int), ("stop.max_steps", 0, 2**31 - 1, int),
    ("stop.max_epochs", 0.0, 1e6, float), ("stop.patience", 0, 2**31 - 1, int),
    ("stop.min_delta", 0.0, 3.4e38, float), ("stop.eval_every", 1, 2**31 - 1, int),
    ("checkpoint.every_steps", 0, 2**31 - 1, int), ("checkpoint.keep", 1, 1000, int),
]


def nested(key: str, value: str) -> str:
    """`a.b.c` = value as one line of flow YAML."""
    parts = key.split(".")
    return "".join(f"{p}: {{" for p in parts[:-1]) + f"{parts[-1]}: {value}" + "}" * (len(parts) - 1)


def hostile_spec(rng: random.Random) -> str:
    """A spec meant to cost the coordinator time or memory, or to slip a number past it."""
    base = "model: {name: mlp}\ndata: {dataset: digits}\n"
    case = rng.randrange(6)
    if case == 0:  # aliases: a bomb of random width and depth, or one harmless alias
        width, levels = rng.randint(2, 10), rng.randint(1, 9)
        lists = [f"&a0 [{', '.join(['x'] * width)}]"]
        lists += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
        return base.replace("{name: mlp}", f"{{name: mlp, kwargs: {{v: [{', '.join(lists)}]}}}}")
    if case == 1:  # nesting, around the limit and far past it
        depth = rng.choice([SPEC_LIMITS["depth"] - 4, SPEC_LIMITS["depth"] + 1, 200, 5000])
        return base.replace("{name: mlp}", "{name: mlp, kwargs: {v: " + "[" * depth + "]" * depth + "}}")
    if case == 2:  # size and value count, around the limits
        count = rng.choice([SPEC_LIMITS["values"] - 50, SPEC_LIMITS["values"] + 10, 30_000, 200_000])
        return base.replace("{name: mlp}", "{name: mlp, kwargs: {v: [" + ", ".join(["1"] * count) + "]}}")
    if case == 3:  # a long value in a key that echoes it
        key = rng.choice(["name", "model.name", "data.dataset", "transport.dtype", "consistency.mode"])
        return base + nested(key, "x" * rng.choice([100, 5000, 60_000])) + "\n"
    # a number at the edge of its range, or just past it, or far past it
    key, low, high, kind = rng.choice(NUMBERS)
    value = rng.choice([low, high, high * 2 if kind is float else high + 1, 10**30, -(10**30), "1e999",
                        "9" * 400, low - 1 if kind is int else -1.0])
    if key.startswith("stop."):  # with a stop condition, unless it is the one at stake
        stop = "" if key in ("stop.max_steps", "stop.max_epochs") else "max_steps: 5, "
        return base + f"stop: {{{stop}{key[5:]}: {value}}}\n"
    return base + "stop: {max_steps: 5}\n" + nested(key, str(value)) + "\n"


def test_coordinator_answers_hostile_specs_at_once_and_lists_whatever_it_accepted():
    """Random hostile specs: each is answered within the deadline, refusals are INVALID_ARGUMENT
    with a bounded message, and every spec accepted can be listed (no number out of what the
    reply can carry)."""
    coord = harness.start("shardps-coordinator", "--port", "0")
    rng = random.Random(SEED + 2)
    outcomes: dict = {}
    start = time.monotonic()
    with rpc.make_channel(coord.address) as channel:
        for _ in range(300):
            if time.monotonic() - start > BUDGET_S:
                break
            text = hostile_spec(rng)
            code = call(channel, "/shardps.v1.Coordinator/SubmitJob", coordinator_pb2.SubmitJobRequest(spec_yaml=text))
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, text[:200])
            outcomes[code.name] = outcomes.get(code.name, 0) + 1
            call_list_jobs(channel)  # raises if any accepted job cannot be listed
        stub = channel.unary_unary("/shardps.v1.Coordinator/SubmitJob",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=lambda b: b)
        for _ in range(20):  # and the messages of refusals stay short
            text = hostile_spec(rng)
            try:
                stub(coordinator_pb2.SubmitJobRequest(spec_yaml=text), timeout=DEADLINE_S)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert len(exc.details()) <= SPEC_LIMITS["message"], exc.details()[:200]
    assert outcomes.get("OK") and outcomes.get("INVALID_ARGUMENT", 0) > 100, outcomes
    assert coord.proc.poll() is None, coord.output()
    assert_healthy(coord.address)


@pytest.mark.parametrize("dtype", [common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data_plane"])
def test_a_push_that_would_overflow_adams_state_is_refused_and_changes_nothing(server, data_plane, dtype):
    """3e38 is finite in fp32 but its square is not: Adam's second moment would become inf and
    those weights would never move again. Refused on both transports; at MAX_GRADIENT a push
    applies and every weight keeps moving."""
    shard_map, _ = fuzzed_job(server)
    before, versions = weights(server)
    grad = torch.ones(TOTAL)
    grad[:100] = 3e38
    with PSClient(JOB, shard_map, worker_id=WORKER, data_plane=data_plane, dtype=dtype) as ps:
        with pytest.raises(grpc.RpcError) as info:
            ps.push(grad, step=10, base_version=versions[0], batch_size=1)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Adam" in info.value.details(), info.value.details()
        after, versions_after = weights(server)
        assert torch.equal(after, before) and versions_after == versions
        grad[:100] = -MAX_GRADIENT
        assert ps.push(grad, step=11, base_version=versions[0], batch_size=1)[0].status == ps_pb2.PUSH_STATUS_APPLIED
        moved, _ = weights(server)
        assert ps.push(torch.ones(TOTAL), step=12, base_version=versions[0] + 1,
                       batch_size=1)[0].status == ps_pb2.PUSH_STATUS_APPLIED
    final, _ = weights(server)
    assert torch.isfinite(final).all() and bool((final != moved).all())
    assert server.proc.poll() is None, server.output()


GARBAGE = (b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08")  # no message type parses these


def test_garbage_request_bytes_are_invalid_argument_with_one_log_line_and_no_traceback():
    """Issue 10, item 9: bytes that parse as no request, sent to every method of the parameter
    server, the coordinator and the health service (unary and streaming), are answered
    INVALID_ARGUMENT, each with one log line and no traceback."""
    server = harness.start("shardps-server", "--port", "0", "--coordinator", "")
    coord = harness.start("shardps-coordinator", "--port", "0")
    services = [(server, ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]),
                (coord, coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]),
                (server, health_pb2.DESCRIPTOR.services_by_name["Health"])]
    sent = {server: 0, coord: 0}
    for daemon, service in services:
        with grpc.insecure_channel(daemon.address) as channel:
            for method in service.methods:
                for body in GARBAGE:
                    streams = (method.client_streaming, method.server_streaming)
                    code = call(channel, f"/{service.full_name}/{method.name}",
                                [body] if streams[0] else body, *streams)
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (service.name, method.name, body, code)
                    sent[daemon] += 1
    for daemon, count in sent.items():
        harness.poll(lambda d=daemon, n=count: len(d.matches("the request does not parse")) >= n, 10,
                     what="a log line per garbage request")
        assert len(daemon.matches("the request does not parse")) == count, daemon.output()
        assert not daemon.matches("Traceback|Exception deserializing|ERROR"), daemon.output()
        assert daemon.proc.poll() is None
        assert_healthy(daemon.address)


# -- identifiers that would be paths (issue 10, item 1) -------------------------------------------

HOSTILE_PARTS = ["..", "../..", "/", "/etc/passwd", "\0", "\n", "\r\n", "x" * 300, ".", ".tmp-0-x",
                 "~", "jöb", "\u2028", " ", "\\", "%2e%2e", "job\n", "-rf", "_", "a" * 129]


def hostile_id(rng, tmp) -> str:
    """A job or worker id that breaks the rule of proto/names.py: path pieces, control
    characters, the other server's absolute data dir, or too long."""
    while True:
        pieces = [rng.choice(HOSTILE_PARTS + [JOB, str(tmp), str(tmp / "other" / "jobs" / JOB)])
                  for _ in range(rng.randint(1, 4))]
        value = rng.choice(["", "/", "\0"]).join(pieces)
        if not names.is_valid(value):
            return value


def assert_refused(what: str, code, message: str, tmp) -> None:
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, message)
    assert str(tmp) not in message and str(tmp.resolve()) not in message, (what, message)
    assert len(message) < 300 and message.isprintable(), (what, message)


def hostile_calls(stub, bad: str, config, header) -> dict:
    """One call of every server RPC that takes a job or worker id, carrying `bad`."""
    return {
        "InitShard": lambda: stub.InitShard(iter([ps_pb2.InitShardRequest(
            config=config, dtype=common_pb2.DTYPE_FLOAT32)]), timeout=DEADLINE_S),
        "DropJob": lambda: stub.DropJob(ps_pb2.DropJobRequest(job_id=bad), timeout=DEADLINE_S),
        "GetShardInfo": lambda: stub.GetShardInfo(ps_pb2.GetShardInfoRequest(job_id=bad),
                                                  timeout=DEADLINE_S),
        "Checkpoint": lambda: stub.Checkpoint(ps_pb2.CheckpointRequest(job_id=bad),
                                              timeout=DEADLINE_S),
        "ListCheckpoints": lambda: stub.ListCheckpoints(ps_pb2.ListCheckpointsRequest(job_id=bad),
                                                        timeout=DEADLINE_S),
        "Pull": lambda: list(stub.Pull(ps_pb2.PullRequest(job_id=bad, timeout_ms=1),
                                       timeout=DEADLINE_S)),
        "Push": lambda: stub.Push(iter([ps_pb2.PushRequest(header=header)]), timeout=DEADLINE_S),
        "InitRows": lambda: stub.InitRows(ps_pb2.InitRowsRequest(job_id=bad, table=bad),
                                          timeout=DEADLINE_S),
        "PullRows": lambda: stub.PullRows(ps_pb2.PullRowsRequest(job_id=bad, table="t"),
                                          timeout=DEADLINE_S),
        "PushRows": lambda: stub.PushRows(ps_pb2.PushRowsRequest(
            job_id=JOB, worker_id=bad, table=bad), timeout=DEADLINE_S),
    }


def send_hostile(stub, port: int, rng, config, tmp) -> int:
    """Sends one hostile id to every RPC (gRPC and data plane); returns how many were refused."""
    bad = hostile_id(rng, tmp)
    header = real_header(rng)
    setattr(header, rng.choice(["job_id", "worker_id"]), bad)
    cfg = ps_pb2.ShardConfig()
    cfg.CopyFrom(config)
    cfg.job_id, cfg.shard_index, cfg.offset, cfg.length, cfg.total = JOB, 0, 0, TOTAL, TOTAL
    setattr(cfg, rng.choice(["job_id", "resume_from_job"]), bad)
    refused = 0
    for what, send in hostile_calls(stub, bad, cfg, header).items():
        try:
            send()
            raise AssertionError(f"{what} accepted {bad!r}")
        except grpc.RpcError as exc:
            assert_refused(what, exc.code(), exc.details() or "", tmp)
        refused += 1
    hello = dataplane.MAGIC + dataplane.TOKEN_LEN.pack(0)
    pull = dataplane.frame(dataplane.PULL,
                           ps_pb2.PullRequest(job_id=bad, timeout_ms=1).SerializeToString())
    push = dataplane.frame(dataplane.PUSH, header.SerializeToString()) + bytes(4 * TOTAL)
    for kind, sent in (("pull", pull), ("push", push)):
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
            sock.sendall(hello + sent)
            assert dataplane.recv_frame(sock) == (0, b"")  # the hello's answer
            code, reply = dataplane.recv_frame(sock)
        assert_refused(f"data plane {kind}", dataplane.status_code(code),
                       reply.decode("utf-8", "replace"), tmp)
        refused += 1
    return refused


def outside_of(root, data_dir) -> list:
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")
                  if data_dir not in (p, *p.parents))


def test_hostile_ids_are_refused_by_every_server_rpc_and_reach_no_path(tmp_path):
    """Job and worker ids built from path pieces, control characters and another data dir's
    absolute path, sent to every RPC of a server with a data dir (gRPC and the data plane):
    each is refused with INVALID_ARGUMENT, a bounded message naming no server path; nothing
    outside the data dir appears or changes, and the real job is untouched."""
    data_dir, other = tmp_path / "data", tmp_path / "other"
    victim = harness.start("shardps-server", "--port", "0", "--coordinator", "",
                           "--data-dir", str(other))
    fuzzed_job(victim)
    victim.stop()
    srv = harness.start("shardps-server", "--port", "0", "--coordinator", "",
                        "--data-dir", str(data_dir))
    _, config = fuzzed_job(srv)
    before, versions = weights(srv)
    outside = outside_of(tmp_path, data_dir)
    rng = random.Random(SEED + 2)
    refused = 0
    start = time.monotonic()
    with rpc.make_channel(srv.address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        port = stub.GetDataPlane(ps_pb2.GetDataPlaneRequest(), timeout=DEADLINE_S).port
        for _ in range(300):
            if time.monotonic() - start > BUDGET_S:
                break
            refused += send_hostile(stub, port, rng, config, tmp_path)
    assert refused >= 500, refused
    assert srv.proc.poll() is None, srv.output()
    assert_healthy(srv.address)
    after, versions_after = weights(srv)
    assert torch.equal(after, before) and versions_after == versions
    assert outside_of(tmp_path, data_dir) == outside
    assert sorted(p.name for p in (data_dir / "jobs").iterdir()) == [JOB]
