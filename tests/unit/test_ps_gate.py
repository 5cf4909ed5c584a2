"""The shard's parts on their own, without a shard: the consistency gate, fencing and dedup,
what a capture leaves out, and the forced-capture handshake."""

import threading

import pytest
import torch

from shardps.proto import common_pb2, ps_pb2
from shardps.server.ps.capture import ForcedCaptures, without_open_round
from shardps.server.ps.errors import FencedError, StepAheadError, UnknownWorkerError
from shardps.server.ps.fencing import Fencing
from shardps.server.ps.gate import Contribution, Gate, round_terms
from tests.harness import poll

SYNC, SSP = common_pb2.CONSISTENCY_SYNC, common_pb2.CONSISTENCY_SSP
LIVE = ["w0", "w1", "w2"]


def gate(mode=SYNC, staleness=0):
    released: list[torch.Tensor] = []
    return Gate(mode, staleness, "job j shard 0", released.append), released


def test_round_terms_weigh_by_batch_size_and_leave_out_empty_batches():
    a, b, c = torch.ones(2), torch.full((2,), 2.0), torch.full((2,), 3.0)
    [(grad, weight)] = round_terms([Contribution(4, a)])
    assert grad is a and weight is None  # one gradient is used as is
    terms = round_terms([Contribution(1, a), Contribution(0, b), Contribution(3, c)])
    assert [(t is g, w) for (t, w), g in zip(terms, (a, c), strict=True)] == [(True, 0.25),
                                                                              (True, 0.75)]
    assert [w for _, w in round_terms([Contribution(0, a), Contribution(0, b)])] == [0.5, 0.5]


def test_sync_check_answers_stale_duplicate_or_raises_step_ahead():
    g, _ = gate()
    assert g.check("w0", 3, version=3) is None
    assert g.check("w0", 2, version=3) == ps_pb2.PUSH_STATUS_STALE
    with pytest.raises(StepAheadError):
        g.check("w0", 4, version=3)
    g.contribute("w0", 1, torch.ones(2), LIVE)
    assert g.check("w0", 3, version=3) == ps_pb2.PUSH_STATUS_DUPLICATE
    assert gate(SSP)[0].check("w0", 0, version=3) is None  # only sync has rounds


def test_a_round_closes_in_rank_order_without_workers_that_left_and_counts_short():
    g, released = gate()
    grads = {w: torch.full((2,), float(i)) for i, w in enumerate(LIVE)}
    assert not g.contribute("w2", 1, grads["w2"], LIVE)
    assert not g.contribute("w1", 1, grads["w1"], LIVE)
    assert not g.complete(LIVE) and g.complete(["w1", "w2"])
    parts = g.take_round(["w0", "w2"], version=0)  # w1 left mid-round
    assert [p.grad for p in parts] == [grads["w2"]] and released == [grads["w1"]]
    assert g.short_rounds == 1 and not g.round


def test_ssp_pulls_wait_for_the_slowest_live_worker_and_record_the_spread():
    g, _ = gate(SSP, staleness=1)
    for step in range(3):
        g.record("w0", step)
    assert g.clock_ok(1, ["w0", "w1"]) and not g.clock_ok(2, ["w0", "w1"])
    assert g.clock_ok(3, ["w0"])  # w1 left
    g.granted(1, ["w0", "w1"])
    assert g.max_clock_spread == 1
    assert gate(SYNC)[0].clock_ok(100, ["w0"])


def test_fencing_refuses_old_incarnations_unknown_workers_and_answers_duplicates():
    f = Fencing()
    f.adopt({"w0": 1, "w1": 1})
    f.adopt({"w0": 2})  # w0 came back as incarnation 2; w1 left
    with pytest.raises(FencedError):
        f.check("w0", 1, 0, ["w0"])
    with pytest.raises(FencedError):
        f.check("w1", 1, 0, ["w0"])
    with pytest.raises(UnknownWorkerError):
        f.check("w9", 0, 0, ["w0"])
    assert f.check("w0", 2, 5, ["w0"]) is None
    f.record("w0", 2, 5)
    assert f.check("w0", 2, 5, ["w0"]) == ps_pb2.PUSH_STATUS_DUPLICATE
    assert f.check("w0", 2, 6, ["w0"]) is None


def test_a_capture_leaves_out_the_pushes_of_the_open_round():
    applied = {("w0", 1): 4, ("w1", 1): 3}
    clocks = {"w0": 5, "w1": 4}
    kept_applied, kept_clocks = without_open_round(applied, clocks, ["w0"], version=4)
    assert kept_applied == {("w0", 1): 3, ("w1", 1): 3} and kept_clocks == {"w0": 4, "w1": 4}
    assert applied == {("w0", 1): 4, ("w1", 1): 3}  # the tables themselves are untouched


def test_a_forced_capture_is_filled_by_the_version_change_it_waits_for():
    cond = threading.Condition(threading.Lock())
    version = [0]
    captured: list[int] = []

    def capture():
        captured.append(version[0])
        return version[0]

    captures = ForcedCaptures(cond)
    done = []
    waiter = threading.Thread(target=lambda: done.append(
        captures.wait(2, lambda: version[0] < 2, lambda: False, capture, timeout=30)))
    waiter.start()
    poll(lambda: captures._pending, 10, interval=0.01, what="a pending capture")
    with cond:
        for version[0] in (1, 2):
            assert captures.fulfil_locked(version[0], capture) == (version[0] == 2)
        cond.notify_all()
    waiter.join(30)
    assert done[0].state == 2 and captured == [2] and not captures._pending
    # Already there: captured at once on the caller's thread; timed out: the current state.
    assert captures.wait(1, lambda: False, lambda: False, capture, timeout=30).state == 2
    assert captures.wait(9, lambda: True, lambda: False, capture, timeout=0.01).state == 2
    assert not captures._pending
