"""When the gateway sweeps what it froze (gateway/server/gc_tuning.py): rarely while connections
only live, but always before what closed connections left behind grows without bound."""

from __future__ import annotations

import pytest

from gateway.server.gc_tuning import SWEEP_AT_MOST_EVERY, SWEEP_AT_MOST_GROWTH, sweep_due


@pytest.mark.parametrize("grown, after_sweep, seconds, due", [
    (0, 1_000_000, 3600, False),  # 10,000 open sockets that only live: never a sweep
    (900_000, 1_000_000, 3600, True),  # connections churning (the frozen set is their leftovers)
    (SWEEP_AT_MOST_GROWTH, 5_000_000, SWEEP_AT_MOST_EVERY, True),  # a large process: growth is capped
    (SWEEP_AT_MOST_GROWTH - 1, 5_000_000, 3600, False),
    (150_000, 100_000, SWEEP_AT_MOST_EVERY - 0.1, False),  # at most one sweep per interval
    (150_000, 100_000, SWEEP_AT_MOST_EVERY, True),
    (19_999, 1_000, 3600, False),  # a small process is not swept for a few thousand objects
    (20_000, 1_000, 3600, True),
])
def test_a_sweep_is_due_when_the_frozen_set_has_grown_enough_and_not_too_often(grown, after_sweep, seconds, due):
    assert sweep_due(grown, after_sweep, seconds) is due


def test_churning_connections_are_swept_within_bounded_garbage():
    """At thousands of short connections a second (each leaving a few frozen cycles behind),
    whatever the process holds, the frozen leftovers never pass the cap for longer than one
    interval."""
    after_sweep = 10_000_000  # a gateway holding very many live objects
    per_second = 3000 * 5  # 3,000 connections a second, 5 cyclic objects each
    grown, seconds, longest = 0, 0.0, 0
    for _ in range(600):  # one minute, ten ticks a second
        grown += per_second // 10
        seconds += 0.1
        longest = max(longest, grown)
        if sweep_due(grown, after_sweep, seconds):
            grown, seconds = 0, 0.0
    assert longest <= SWEEP_AT_MOST_GROWTH + per_second * SWEEP_AT_MOST_EVERY
