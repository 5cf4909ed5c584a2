"""Hostile input to the row RPCs (InitRows, PullRows, PushRows) of a live server process, fuzzed
like the dense path (tests/e2e/test_fuzz.py): random messages and garbage bytes, and plausible
calls for the real table that are wrong in one way (wrong dim, NaN rows, wrong dtype, ids of
the wrong width, duplicate or unsorted ids, unknown tables, truncated bytes, huge counts).
Every call is answered with a handled status, each targeted one with the status it must get
and a bounded message naming the table; afterwards the table's rows are what they were, and
the next valid push is the table's first optimizer step (bitwise one lazy Adam step from the
seeded rows), so no refused call changed a row, a moment or the step count.
"""

import random
import struct
import time

import grpc
import pytest
import torch

from shardps.proto import common_pb2, ps_pb2, ps_pb2_grpc, rowcodec
from shardps.proto.tables import FixedLayout
from shardps.psclient import PSClient
from shardps.psclient.rows import RowClient
from shardps.runtime import rpc
from shardps.server.ps.table_shard import TableShard
from shardps.server.ps.tables import make_optimizer, table_config
from tests import harness
from tests.e2e.test_fuzz import BUDGET_S, DEADLINE_S, assert_healthy, call, check, random_message

SEED = 20261201
JOB, WORKER, TABLE, ROWS, DIM = "fuzzrows", "worker-real", "t", 50, 4
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
SPEC = ps_pb2.TableSpec(name=TABLE, dim=DIM, num_embeddings=ROWS, num_shards=1,
                        optimizer="lazy_adam", lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.fixture
def table_job():
    """A server process holding job JOB (async, one worker) with table "t" [50, 4], seeded
    and past version 0 (one dense push); yields (server, shard map, seeded rows by id)."""
    server = harness.start("shardps-server", "--port", "0", "--coordinator", "")
    shard_map = common_pb2.ShardMap(version=1, shards=[common_pb2.ShardRange(
        index=0, server_id="s", address=server.address, offset=0, length=8)])
    config = ps_pb2.ShardConfig(
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.999,
                                             eps=1e-8),
        mode=common_pb2.CONSISTENCY_ASYNC, workers=[WORKER], epoch=1, tables=[SPEC])
    rows = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))  # by id
    in_slot_order = rows[FixedLayout(TABLE, ROWS, 1).ids_on(0)]
    with PSClient(JOB, shard_map, worker_id=WORKER) as ps:
        ps.init(torch.zeros(8), config)
        client = RowClient(JOB, shard_map, worker_id=WORKER)
        client.init_rows(TABLE, 0, in_slot_order)
        assert ps.push(torch.ones(8), step=0, base_version=0, batch_size=1)[0].status == \
            ps_pb2.PUSH_STATUS_APPLIED
    yield server, shard_map, rows
    client.close()
    server.stop()


def ids_bytes(values) -> bytes:
    return rowcodec.encode_ids(torch.tensor(values, dtype=torch.int64))


def rows_bytes(n: int, dim: int = DIM, value: float = 0.5) -> bytes:
    return rowcodec.encode_rows(torch.full((n, dim), value))


GOOD_IDS = ids_bytes([1, 5, 7])
# Fields that make a PushRows wrong in one way -> (status, part of the message).
BAD_PUSHES = {
    "wider rows": ({"rows": rows_bytes(3, DIM + 1)}, INVALID, "fp32"),
    "narrower rows": ({"rows": rows_bytes(3, DIM - 1)}, INVALID, "fp32"),
    "fewer rows": ({"rows": rows_bytes(2)}, INVALID, "fp32[3, 4]"),
    "NaN rows": ({"rows": rows_bytes(3, value=float("nan"))}, INVALID, "non-finite"),
    "inf rows": ({"rows": rows_bytes(3, value=float("-inf"))}, INVALID, "non-finite"),
    "bf16 dtype": ({"dtype": common_pb2.DTYPE_BFLOAT16}, INVALID, "DTYPE_FLOAT32"),
    "unknown dtype": ({"dtype": 99}, INVALID, "unknown dtype 99"),
    "int32 ids": ({"ids": struct.pack("<3i", 1, 5, 7)}, INVALID, "int64"),
    "truncated ids": ({"ids": GOOD_IDS[:-1]}, INVALID, "int64"),
    "truncated rows": ({"rows": rows_bytes(3)[:-3]}, INVALID, "table 't'"),
    "duplicate ids": ({"ids": ids_bytes([1, 5, 5])}, INVALID, "strictly increasing"),
    "unsorted ids": ({"ids": ids_bytes([5, 1, 7])}, INVALID, "strictly increasing"),
    "id past the end": ({"ids": ids_bytes([1, 5, ROWS])}, INVALID, f"id {ROWS} is out of range"),
    "negative id": ({"ids": ids_bytes([-1, 1, 5])}, INVALID, "id -1"),
    "huge id count": ({"ids": ids_bytes(list(range(1 << 20)))}, INVALID, "table 't'"),
    "unknown table": ({"table": "nope"}, INVALID, "unknown table 'nope'"),
    "table name a path": ({"table": "../" * 50}, INVALID, "table"),
    "negative step": ({"step": -3}, INVALID, "step must be >= 0"),
    "unknown worker": ({"worker_id": "w9"}, PRECONDITION, "not a live worker"),
    "unknown job": ({"job_id": "nojob"}, grpc.StatusCode.NOT_FOUND, ""),
    "other shard": ({"shard_index": 3}, grpc.StatusCode.NOT_FOUND, ""),
}
BAD_PULLS = {
    "duplicate ids": ({"ids": ids_bytes([2, 2])}, INVALID, "strictly increasing"),
    "unsorted ids": ({"ids": ids_bytes([9, 2])}, INVALID, "strictly increasing"),
    "truncated ids": ({"ids": ids_bytes([2, 9])[:-5]}, INVALID, "int64"),
    "id past the end": ({"ids": ids_bytes([2, 1 << 40])}, INVALID, "out of range"),
    "huge id count": ({"ids": ids_bytes(list(range(1 << 20)))}, INVALID, "out of range"),
    "unknown table": ({"table": "nope"}, INVALID, "unknown table 'nope'"),
}
BAD_INITS = {
    "rows past the end": ({"rows": rows_bytes(ROWS - 1), "first_row": 2}, INVALID,
                          "holds 50 rows, got rows [2, 51)"),
    "negative first row": ({"rows": rows_bytes(ROWS), "first_row": -1}, INVALID,
                           "got rows [-1, 49)"),
    "wider rows": ({"rows": rows_bytes(ROWS, DIM + 1)}, INVALID, "table 't'"),
    "NaN rows": ({"rows": rows_bytes(ROWS, value=float("nan"))}, INVALID, "non-finite"),
    "truncated rows": ({"rows": rows_bytes(ROWS)[:-1]}, INVALID, "table 't'"),
    "unknown table": ({"table": "nope"}, INVALID, "unknown table 'nope'"),
    # Well formed, but the shard has taken a step: its rows are training.
    "after the first step": ({}, PRECONDITION, "rows are set before the first step"),
}


def request(kind: str, fields: dict):
    """A valid request of `kind` for the real table with `fields` replaced."""
    base = {"job_id": JOB, "shard_index": 0, "table": TABLE}
    if kind == "PushRows":
        base.update(worker_id=WORKER, step=1, batch_size=1, ids=GOOD_IDS, rows=rows_bytes(3),
                    dtype=common_pb2.DTYPE_FLOAT32)
        cls = ps_pb2.PushRowsRequest
    elif kind == "PullRows":
        base.update(ids=ids_bytes([2, 9]), timeout_ms=10)
        cls = ps_pb2.PullRowsRequest
    else:
        base.update(rows=rows_bytes(ROWS))
        cls = ps_pb2.InitRowsRequest
    return cls(**{**base, **fields})


def send_targeted(stub) -> int:
    sent = 0
    for kind, cases in (("PushRows", BAD_PUSHES), ("PullRows", BAD_PULLS),
                        ("InitRows", BAD_INITS)):
        for case, (fields, code, message) in cases.items():
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, kind)(request(kind, fields), timeout=DEADLINE_S)
            details = refused.value.details() or ""
            assert refused.value.code() == code, (kind, case, refused.value.code(), details)
            assert message in details and len(details) < 300, (kind, case, details)
            sent += 1
    return sent


def send_random(channel, rng: random.Random, codes: dict) -> None:
    """Random messages (their strings never name the real table) and garbage bytes."""
    kind = rng.choice(["InitRows", "PullRows", "PushRows"])
    method = f"/shardps.v1.ParameterServer/{kind}"
    if rng.random() < 0.3:
        check(codes, kind, call(channel, method, rng.randbytes(rng.randint(0, 200))), raw=True)
        return
    msg = random_message(getattr(ps_pb2, f"{kind}Request"), rng)
    if hasattr(msg, "timeout_ms"):
        msg.timeout_ms = rng.choice([0, 1, 10])
    if rng.random() < 0.5:  # the real job, so the checks past the job lookup are reached
        msg.job_id, msg.shard_index = JOB, 0
    check(codes, kind, call(channel, method, msg), raw=False)


def test_row_rpcs_refuse_hostile_input_and_change_no_row(table_job):
    server, shard_map, seeded = table_job
    rows = RowClient(JOB, shard_map, worker_id=WORKER)
    every = torch.arange(ROWS)
    rng, codes, targeted = random.Random(SEED), {}, 0
    start = time.monotonic()
    with rpc.make_channel(server.address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        for _ in range(3):
            targeted += send_targeted(stub)
        for _ in range(600):
            if time.monotonic() - start > BUDGET_S:
                break
            send_random(channel, rng, codes)
    assert targeted == 3 * (len(BAD_PUSHES) + len(BAD_PULLS) + len(BAD_INITS))
    assert sum(codes.values()) >= 300 and len(codes) >= 2, codes
    assert codes.get(grpc.StatusCode.OK, 0) < sum(codes.values()), codes
    assert server.proc.poll() is None, server.output()
    assert not server.matches("Traceback"), server.output()
    assert_healthy(server.address)
    reply, now = rows.pull_rows(TABLE, 0, every, DIM, timeout_s=5)
    assert reply.ready and torch.equal(now, seeded)
    # The next valid push is the table's first step: bitwise what the server's own lazy Adam
    # does to the seeded rows in one step.
    ids, grads = torch.tensor([1, 5, 7]), torch.randn(3, DIM, generator=torch.Generator())
    assert rows.push_rows(TABLE, 0, ids, grads, step=1, batch_size=1).status == \
        ps_pb2.PUSH_STATUS_APPLIED
    expected = TableShard(table_config(SPEC, 0), make_optimizer(SPEC),
                          weights=seeded[FixedLayout(TABLE, ROWS, 1).ids_on(0)])
    expected.apply(ids, grads)
    _, after = rows.pull_rows(TABLE, 0, every, DIM, timeout_s=5)
    assert torch.equal(after, expected.lookup(every))
    assert not torch.equal(after, seeded)
    rows.close()
