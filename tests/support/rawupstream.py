"""Hostile upstreams on raw sockets: a server that answers each request head with a script of
bytes (sent at once or trickled), and records whether the gateway then closed the connection."""

from __future__ import annotations

import asyncio

import pytest

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def raw_upstream():
    """Factory: an upstream that runs `script(head, reader, writer)` on each connection once it
    has read the request head. Its `closed` records, per connection, whether the gateway then
    closed it (within 10 s). A request for /healthy is answered `OK` instead."""
    servers = []

    async def start(script):
        closed = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /healthy "):
                    writer.write(OK)
                else:
                    await script(head, reader, writer)
                await writer.drain()
                closed.append(await asyncio.wait_for(reader.read(), 10) == b"")
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                closed.append(False)
            except (ConnectionError, OSError):
                closed.append(True)  # reset by the gateway: closed too
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        server.closed = closed
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def answer(raw: bytes, *, piece: int = 0, pause: float = 0.0):
    """A script that sends `raw`, in pieces of `piece` bytes with `pause` between them; it stops
    quietly when the gateway hangs up."""

    async def script(head, reader, writer):
        try:
            if not piece:
                writer.write(raw)
                return
            for i in range(0, len(raw), piece):
                writer.write(raw[i:i + piece])
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
        except (ConnectionError, OSError):
            pass

    return script
