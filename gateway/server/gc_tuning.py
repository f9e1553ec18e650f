"""The garbage collector with many long-lived connections open.

CPython 3.11 runs a full collection whenever the objects that reached the oldest generation
since the last one number a quarter of those already there, and a full collection walks every
tracked object. With 10,000 relayed WebSockets (about 130 tracked objects each) that stopped
every relay for about a second, several times while they were opened and now and then after.
An object that lives as long as its connection is not garbage while the connection is open,
and when it closes it is freed by reference counting (a closed relay leaves no cycles:
tests/test_websocket.py checks it), so walking it again and again finds nothing.

So ten times a second what survives a young collection is moved out of the collector's view
(`gc.freeze`): a full collection then walks only what grew old within the last 100 ms, however
many connections are open. The young collection is on the clock too: each message a socket
receives leaves ~8 new objects waiting for the next one while the previous ones are freed, so
the collector's allocation count stays flat while the young generation grows by thousands a
second, and its own young collections (50-100 ms each with 10,000 sockets) came seldom and big.

What is frozen and later becomes cyclic garbage (a short-lived connection frozen while it was
open leaves a transport cycle behind) is reclaimed only by a sweep (unfreeze, full collection,
freeze): after startup, after each reload of the routes (the old table), and when the frozen
set has grown by as many objects as the last sweep left, but never by more than
SWEEP_AT_MOST_GROWTH (so that churning connections cannot grow memory without bound), at most
once every SWEEP_AT_MOST_EVERY seconds. That is one pause in proportion to the live objects,
and only while the frozen set grows, instead of one every few seconds.

`SANDGATE_GC_TUNING=off` keeps the collector as it was before (a sweep at startup and reload,
the collector's own schedule in between): the reference series of bench/many_websockets.py.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

ENABLED = os.environ.get("SANDGATE_GC_TUNING", "on").strip().lower() not in ("off", "0", "false", "no")
FREEZE_EVERY = 0.1  # seconds an object lives at most in the collector's view before it is frozen
SWEEP_AT_MOST_GROWTH = 250_000  # objects (tens of MiB): the most the frozen set grows between sweeps
SWEEP_AT_LEAST_GROWTH = 20_000  # objects: below this, sweeping a small process is not worth it
SWEEP_AT_MOST_EVERY = 10.0  # seconds


class _Frozen:
    """What the last sweep left frozen, and what was frozen since (an upper bound of the growth:
    frozen objects that died since are not subtracted)."""

    after_sweep = 0
    since_sweep = 0
    swept_at = float("-inf")


def sweep() -> None:
    """Collect everything once, then freeze what is alive (the route table, open connections)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _Frozen.after_sweep = gc.get_freeze_count()
    _Frozen.since_sweep = 0
    _Frozen.swept_at = time.monotonic()


def sweep_due(grown: int, after_sweep: int, seconds_since: float) -> bool:
    """Whether the frozen set, `grown` objects larger than the `after_sweep` the last sweep
    left `seconds_since` ago, is due for a sweep."""
    if seconds_since < SWEEP_AT_MOST_EVERY:
        return False
    return grown >= min(max(after_sweep, SWEEP_AT_LEAST_GROWTH), SWEEP_AT_MOST_GROWTH)


def freeze_survivors() -> None:
    """Freeze what survives a young collection: the objects of open connections and whatever
    else is alive now. The collection first, so that fresh garbage is not frozen with them;
    it walks what was allocated within the last FREEZE_EVERY, a few milliseconds' work."""
    gc.collect(1)
    _Frozen.since_sweep += len(gc.get_objects(generation=2))
    gc.freeze()
    seconds_since = time.monotonic() - _Frozen.swept_at
    if not sweep_due(_Frozen.since_sweep, _Frozen.after_sweep, seconds_since):
        return
    # Counting the frozen set walks it (milliseconds per million objects): only now. The count
    # above is an upper bound (frozen objects freed since are not subtracted); this one is exact.
    grown = gc.get_freeze_count() - _Frozen.after_sweep
    if sweep_due(grown, _Frozen.after_sweep, seconds_since):
        sweep()
    else:
        _Frozen.since_sweep = max(grown, 0)


async def keep_old_objects_frozen() -> None:
    """Runs for the life of the gateway (nothing when the tuning is off)."""
    if not ENABLED:
        return
    while True:
        await asyncio.sleep(FREEZE_EVERY)
        freeze_survivors()
