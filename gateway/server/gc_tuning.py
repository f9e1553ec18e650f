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

What is frozen and later becomes cyclic garbage is reclaimed only by a sweep (unfreeze, full
collection, freeze): after startup, after each reload of the routes (the old table), and when
the frozen set has doubled since the last sweep, at most once every ten minutes. That is one
pause in proportion to the live objects, rarely, instead of many.

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
SWEEP_GROWTH = 2.0  # a sweep when the frozen set has grown this much since the last one
SWEEP_AT_MOST_EVERY = 600.0  # seconds


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


def freeze_survivors() -> None:
    """Freeze what survives a young collection: the objects of open connections and whatever
    else is alive now. The collection first, so that fresh garbage is not frozen with them;
    it walks what was allocated within the last FREEZE_EVERY, a few milliseconds' work."""
    gc.collect(1)
    _Frozen.since_sweep += len(gc.get_objects(generation=2))
    gc.freeze()
    if _Frozen.since_sweep < (SWEEP_GROWTH - 1) * _Frozen.after_sweep:
        return
    if time.monotonic() - _Frozen.swept_at < SWEEP_AT_MOST_EVERY:
        return
    # Counting the frozen set walks it (milliseconds per million objects): only now.
    frozen = gc.get_freeze_count()
    if frozen >= SWEEP_GROWTH * _Frozen.after_sweep:
        sweep()
    else:
        _Frozen.since_sweep = frozen - _Frozen.after_sweep


async def keep_old_objects_frozen() -> None:
    """Runs for the life of the gateway (nothing when the tuning is off)."""
    if not ENABLED:
        return
    while True:
        await asyncio.sleep(FREEZE_EVERY)
        freeze_survivors()
