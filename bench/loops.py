"""The event loop every Python process of the benchmark runs on: uvloop when importable,
as sandgate does, so that the bare proxy and sandgate are compared on the same loop."""

import asyncio

from aiohttp import web

try:
    import uvloop
except ImportError:
    uvloop = None

NAME = "uvloop" if uvloop else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()


def serve(app: web.Application, port: int) -> None:
    """Runs an aiohttp server on 127.0.0.1 on this loop, without an access log."""
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=new_event_loop())
