"""The event loop every Python process of the benchmark runs on: uvloop when importable,
as sandgate does, so that the bare proxy and sandgate are compared on the same loop."""

import asyncio

try:
    import uvloop
except ImportError:
    uvloop = None

NAME = "uvloop" if uvloop else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
