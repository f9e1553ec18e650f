"""An upstream that can hold a request at a gate, so "in flight" is a known state in a test."""

from __future__ import annotations

import asyncio

from aiohttp import web


class Gated:
    """Upstream named `name`: GET /gate waits until `release` is set; everything else answers at once."""

    def __init__(self, name: str = "gated"):
        self.name = name
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/gate":
            self.arrived.set()
            await self.release.wait()
        return web.json_response({"backend": self.name, "path": request.raw_path})


async def start_gated(aiohttp_server, name: str = "gated") -> tuple[Gated, int]:
    """A running Gated upstream on loopback and its port (`aiohttp_server` is pytest-aiohttp's fixture)."""
    upstream = Gated(name)
    server = await aiohttp_server(upstream.app, host="127.0.0.1")
    return upstream, server.port
