"""The one doubling retry pause (runtime/backoff.py), on a clock the test moves."""

from shardps.runtime.backoff import Backoff


def test_backoff_doubles_up_to_its_cap_and_stops_at_the_window():
    now = [0.0]
    b = Backoff(0.25, 1.0, 3.0, lambda: now[0])
    pauses = []
    while not b.expired():
        pauses.append(b.next())
        now[0] += pauses[-1]
    assert pauses == [0.25, 0.5, 1.0, 1.0, 0.25]  # the last one ends at the window
    assert b.tries == 5 and now[0] == 3.0


def test_backoff_without_a_window_never_expires_and_a_reset_starts_it_over():
    now = [0.0]
    b = Backoff(0.25, 5.0, clock=lambda: now[0])
    pauses = [b.next() for _ in range(7)]
    assert pauses == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    now[0] = 1e9
    assert not b.expired()
    b.reset()
    assert (b.tries, b.next()) == (0, 0.25)


def test_a_reset_opens_a_new_window():
    now = [0.0]
    b = Backoff(1.0, 1.0, 2.0, lambda: now[0])
    now[0] = 2.0
    assert b.expired()
    b.reset()
    assert not b.expired()
    now[0] = 4.0
    assert b.expired()
