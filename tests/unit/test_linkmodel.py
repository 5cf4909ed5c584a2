"""bench/linkmodel.py, the userspace link's direction, with time passed in: delay, jitter kept
in order, seeded loss, the rate's serialization and queue bound, cut and heal."""

import pytest

from bench.linkmodel import MAX_QUEUED_BYTES, QUEUE_S, Direction, Spec


def test_a_delayed_packet_is_due_after_its_delay_and_not_before():
    d = Direction(Spec(delay_ms=20), seed=0)
    d.offer(b"x" * 100, now=1.0)
    assert d.next_due() == pytest.approx(1.02)
    assert d.pop_due(1.019, limit=10) == []
    assert d.pop_due(1.021, limit=10) == [b"x" * 100]
    assert d.next_due() is None


def test_jitter_varies_the_delay_within_its_bounds_but_never_reorders():
    d = Direction(Spec(delay_ms=10, jitter_ms=8), seed=3)
    for i in range(200):
        d.offer(bytes([i % 256]), now=i * 0.001)
    dues = [due for due, _ in d._queue]
    assert dues == sorted(dues)
    delays = [due - i * 0.001 for i, due in enumerate(dues)]
    # Held back behind an earlier packet, a packet waits no longer than that one's 18 ms.
    assert min(delays) >= 0.002 - 1e-9 and max(delays) <= 0.018 + 1e-9
    assert len({round(x, 6) for x in delays}) > 50  # it does vary


def test_loss_is_seeded_and_near_its_probability():
    def lost(seed: int) -> list[int]:
        d = Direction(Spec(loss=0.05), seed=seed)
        out = []
        for i in range(4000):
            before = d.counters.lost
            d.offer(b"p", now=0.0)
            if d.counters.lost > before:
                out.append(i)
        return out

    assert lost(1) == lost(1) and lost(1) != lost(2)
    assert 120 < len(lost(1)) < 280  # 200 expected
    assert lost(1)[:4] == [9, 13, 19, 20]  # what tests/e2e/test_netns.py's lossy link relies on


def test_a_rate_spaces_packets_by_their_serialization_time_and_bounds_the_queue():
    d = Direction(Spec(rate_bits=8_000_000), seed=0)  # 1 MB/s: 1000 bytes take 1 ms
    for _ in range(3):
        d.offer(b"x" * 1000, now=0.0)
    assert [due for due, _ in d._queue] == pytest.approx([0.001, 0.002, 0.003])
    # Offer far more than QUEUE_S of traffic at once: what would wait longer is dropped.
    for _ in range(500):
        d.offer(b"x" * 1000, now=0.0)
    kept = round(QUEUE_S / 0.001)  # those starting within QUEUE_S (the 101st sits on the bound)
    assert d.queued() in (kept, kept + 1) and d.queued() + d.counters.overflow == 503


def test_an_unlimited_direction_bounds_its_queue_in_bytes():
    d = Direction(Spec(delay_ms=1000), seed=0)
    packet = b"x" * (1 << 20)
    for _ in range(MAX_QUEUED_BYTES // len(packet) + 5):
        d.offer(packet, now=0.0)
    assert d.queued() == MAX_QUEUED_BYTES // len(packet) and d.counters.overflow == 5


def test_cut_drops_the_queue_and_what_comes_until_heal():
    d = Direction(Spec(delay_ms=5), seed=0)
    d.offer(b"a", now=0.0)
    d.cut()
    d.offer(b"b", now=0.001)
    assert d.queued() == 0 and d.counters.cut == 2 and d.pop_due(1.0, limit=10) == []
    d.heal()
    d.offer(b"c", now=1.0)
    got = d.pop_due(2.0, limit=10)
    assert got == [b"c"]
    d.delivered(got[0], True)
    d.delivered(b"zz", False)
    c = d.counters
    assert (c.offered, c.delivered, c.delivered_bytes, c.write_errors, c.cut) == (3, 1, 1, 1, 2)


def test_pop_due_returns_at_most_limit_packets():
    d = Direction(Spec(), seed=0)
    for i in range(10):
        d.offer(bytes([i]), now=0.0)
    assert len(d.pop_due(0.0, limit=4)) == 4 and d.queued() == 6


@pytest.mark.parametrize("fields, message", [
    (dict(delay_ms=-1), "delay_ms -1"), (dict(jitter_ms=70_000), "jitter_ms 70000"),
    (dict(loss=1.0), "loss 1.0"), (dict(rate_bits=-5), "rate_bits -5"),
])
def test_bad_specs_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        Spec(**fields)
