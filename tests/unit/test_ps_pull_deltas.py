"""Compressed pull deltas (server/ps/pull_deltas.py): the worker's copy and the server's
mirror stay bitwise equal, and the copy tracks the weights with bounded error."""

import resource

import pytest
import torch

from shardps.proto import compress
from shardps.server.ps.pull_deltas import HeldCopies, PullReply, apply_reply


def _trajectory(steps, numel):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(numel, generator=g)
    out = []
    for _ in range(steps):  # Adam-like: every weight moves by about lr each step
        w = w - 1e-3 * torch.sign(torch.randn(numel, generator=g))
        out.append(w.clone())
    return out


@pytest.mark.parametrize("comp", [compress.Int8(256), compress.TopK(0.05), compress.Sign(512)],
                         ids=lambda c: c.name)
def test_worker_copy_equals_the_servers_mirror_and_tracks_the_weights(comp):
    copies = HeldCopies(comp)
    copy, worst = None, []
    for version, w in enumerate(_trajectory(60, 4000), start=1):
        reply = copies.reply("w0", version - 1, w, version)
        assert (reply.dense is not None) == (version == 1)  # the first pull is dense, then deltas
        copy = apply_reply(copy, reply, comp)
        assert torch.equal(copy, copies.held("w0"))
        worst.append(float((w - copy).abs().max()))
    # What a delta dropped is sent later: the error does not grow with the number of steps.
    assert max(worst[-10:]) <= 2 * max(worst[1:11]) + 1e-6


def test_int8_deltas_are_about_a_quarter_of_dense_and_stay_close():
    comp = compress.Int8(256)
    copies = HeldCopies(comp)
    copy = None
    for version, w in enumerate(_trajectory(20, 4096), start=1):
        reply = copies.reply("w0", version - 1, w, version)
        copy = apply_reply(copy, reply, comp)
    assert reply.delta is not None and len(reply.delta) == comp.size(4096) < 4096 * 4 / 3.9
    assert float((w - copy).abs().max()) < 1e-4  # deltas of ~1e-3 quantized to 1/127 of their max


def test_a_worker_at_another_version_gets_dense_weights_again():
    comp = compress.Int8()
    copies = HeldCopies(comp)
    w = torch.randn(100)
    copies.reply("w0", 0, w, 1)
    assert copies.reply("w0", 1, w + 1, 2).delta is not None
    reset = copies.reply("w0", 1, w + 2, 3)  # the reply for version 2 was lost
    assert reset.dense is not None and torch.equal(reset.dense, w + 2)
    copies.forget("w0")
    assert copies.reply("w0", 3, w, 4).dense is not None
    assert copies.held_bytes() == 400


def test_mirrors_are_per_worker():
    copies = HeldCopies(compress.Int8())
    w = torch.randn(50)
    copies.reply("w0", 0, w, 1)
    assert copies.reply("w1", 1, w, 1).dense is not None  # w1 has no mirror yet


def test_a_delta_without_a_copy_is_refused():
    with pytest.raises(ValueError, match="needs the copy"):
        apply_reply(None, PullReply(2, delta=compress.Int8().encode(torch.zeros(4))), compress.Int8())


def test_mirrors_of_workers_that_left_are_dropped():
    copies = HeldCopies(compress.Int8())
    w = torch.randn(512)
    copies.reply("w0", 0, w, 1)
    copies.reply("w1", 0, w, 2)
    assert copies.held_bytes() == 2 * 512 * 4
    copies.forget_except(["w1"])
    assert copies.held_bytes() == 512 * 4
    assert copies.reply("w0", 1, w, 3).dense is not None  # w0 comes back: dense again
    assert copies.reply("w1", 2, w, 4).delta is not None


def test_workers_at_the_same_state_share_one_mirror_and_one_encode():
    comp = compress.Int8(256)
    copies = HeldCopies(comp)
    weights = _trajectory(6, 1024)
    held = {w: (0, None) for w in ("w0", "w1", "w2")}
    encoded = []
    for version, w in enumerate(weights, start=1):
        replies = {}
        for worker, (tag, copy) in held.items():
            reply = copies.reply(worker, tag, w, 10 * version + int(worker[1]), version=version)
            replies[worker] = reply
            held[worker] = (reply.version, apply_reply(copy, reply, comp))
            assert torch.equal(held[worker][1], copies.held(worker))
        if version > 1:  # one encode served all three
            assert replies["w0"].delta is replies["w1"].delta is replies["w2"].delta
            encoded.append(replies["w0"].delta)
        assert copies.held("w0") is copies.held("w1") is copies.held("w2")
        assert copies.held_bytes() == 1024 * 4
    # The same bytes as one worker's own mirror would have been sent
    alone, copy = HeldCopies(comp), None
    for version, w in enumerate(weights, start=1):
        reply = alone.reply("w0", version - 1, w, version)
        copy = apply_reply(copy, reply, comp)
        if version > 1:
            assert reply.delta == encoded[version - 2]
    assert torch.equal(copy, held["w2"][1])


def test_a_worker_that_falls_behind_gets_its_own_delta_and_the_others_are_unchanged():
    comp = compress.Sign(64)
    copies = HeldCopies(comp)
    w1, w2, w3 = _trajectory(3, 256)
    a = apply_reply(None, copies.reply("a", 0, w1, 1, version=1), comp)
    b = apply_reply(None, copies.reply("b", 0, w1, 2, version=1), comp)
    a = apply_reply(a, copies.reply("a", 1, w2, 3, version=2), comp)
    b = apply_reply(b, copies.reply("b", 2, w3, 4, version=3), comp)  # b skipped version 2
    assert copies.held("a") is not copies.held("b")
    assert torch.equal(a, copies.held("a")) and torch.equal(b, copies.held("b"))
    a = apply_reply(a, copies.reply("a", 3, w3, 5, version=3), comp)
    assert torch.equal(a, copies.held("a"))


@pytest.mark.parametrize("behind", [0, 1], ids=["saved-at-the-version", "saved-one-behind"])
def test_a_seeded_mirror_gives_workers_without_a_copy_what_the_straight_runs_workers_held(behind):
    """A checkpoint of a shard at version 4 keeps the mirror its workers hold (version 3 right
    after the round closed, or 4 once they pulled it). Seeded into new mirrors (a restore),
    the workers' dense resets at version 4 are the straight run's copies, bitwise, and so
    are the deltas after; a copy of another version is not kept."""
    comp = compress.Sign(64)
    weights = _trajectory(7, 1000)
    straight, held = HeldCopies(comp, sync=True), {}
    copies: dict[str, list[torch.Tensor]] = {"w0": [], "w1": []}
    saved = None
    for version, w in enumerate(weights, start=1):
        if version == 4 + 1 - behind:
            saved = straight.saved(["w0", "w1"], 4, 1000)
        for worker in copies:
            tag, copy = held.get(worker, (0, None))
            reply = straight.reply(worker, tag, w, 10 * version + int(worker[1]), version=version)
            held[worker] = (reply.version, apply_reply(copy, reply, comp))
            copies[worker].append(held[worker][1].clone())
    assert saved is not None and saved[0] == 4 - behind
    assert straight.saved(["w0", "w1"], 9, 1000) is None and straight.saved(["w2"], 7, 1000) is None
    restored = HeldCopies(comp, sync=True)
    restored.seed(*saved)
    now: dict[str, tuple[int, torch.Tensor | None]] = {w: (1, None) for w in copies}  # tags unknown
    for version in range(4, 8):
        for worker, (tag, copy) in now.items():
            reply = restored.reply(worker, tag, weights[version - 1], 100 * version + int(worker[1]),
                                   version=version)
            assert (reply.dense is not None) == (version == 4)
            now[worker] = (reply.version, apply_reply(copy, reply, comp))
            assert torch.equal(now[worker][1], copies[worker][version - 1]), (worker, version)


def test_a_worker_that_lost_its_copy_gets_the_one_its_peers_hold_not_the_weights():
    """Sync: w1 lost its copy (a new client: an unknown tag) while w0 holds version 3's: at
    version 3 it gets w0's copy; at version 4, before w0 has pulled it, w0's copy brought
    to 4 by the delta w0 then takes (one encode for both); asked again at 4, the same copy.
    Alone, a worker gets the weights; and not in sync, a reset is the weights."""
    comp = compress.Int8(64)
    copies = HeldCopies(comp, sync=True)
    weights = _trajectory(4, 512)
    tags = {"w0": 0, "w1": 0}
    for version in (1, 2, 3):
        for worker in tags:
            tags[worker] = copies.reply(worker, tags[worker], weights[version - 1], 10 * version + int(worker[1]),
                                        version=version).version
    lost = copies.reply("w1", 999, weights[2], 100, version=3)
    assert lost.dense is not None and torch.equal(lost.dense, copies.held("w0"))
    assert not torch.equal(lost.dense, weights[2])
    ahead = copies.reply("w1", 999, weights[3], 101, version=4)
    behind = copies.reply("w0", tags["w0"], weights[3], 41, version=4)
    assert ahead.dense is not None and behind.delta is not None
    assert torch.equal(ahead.dense, copies.held("w0")) and copies.held("w0") is copies.held("w1")
    again = copies.reply("w1", 101, weights[3], 102, version=4)
    assert again.dense is not None and torch.equal(again.dense, copies.held("w0"))
    alone = HeldCopies(comp, sync=True)
    assert torch.equal(alone.reply("w0", 0, weights[0], 1, version=1).dense, weights[0])
    unsynced = HeldCopies(comp)
    unsynced.reply("w0", 0, weights[0], 1, version=1)
    assert unsynced.reply("w0", 1, weights[1], 2, version=2).delta is not None
    assert torch.equal(unsynced.reply("w1", 0, weights[1], 3, version=2).dense, weights[1])


def test_a_state_nobody_holds_lends_its_memory_to_the_next():
    """Each round makes a new state of the copy; the one before is freed once no worker holds
    it. A new 36 MB tensor (mmap'd) takes a page fault per 4 KiB page as it is first written
    (~30 ms per 12.5M elements, as much as the encode); a recycled one takes none."""
    n = 9_000_000
    copies = HeldCopies(compress.Sign(), sync=True)
    weights, tag, faults = torch.zeros(n), 0, []
    for version in range(1, 5):
        weights.add_(1e-3)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tag = copies.reply("w0", tag, weights, version, version=version).version
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    pages = n * 4 // 4096
    assert faults[0] > pages // 2 and faults[3] < pages // 4, (faults, pages)
