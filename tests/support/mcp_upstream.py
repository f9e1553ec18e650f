"""A real MCP SDK server upstream, and wire recorders on both sides of the gateway.

- `make_mcp_app()`: the dev stack's MCP server (`gateway.devstack.mcp_server.make_server`: echo, add,
  slow_count, request_headers) plus tools for gateway tests:
  `announce(text)` sends a log message on the session's standalone channel (the GET event stream),
  `quiet(seconds, heads_up)` stays silent for `seconds` (after one progress event if `heads_up`),
  `regional_echo(region, text)` has a parameter mirrored into an `Mcp-Param-Region` header.
- `RecordingASGI`: wraps the ASGI app; records each HTTP exchange as the server saw it
  (request headers, response headers, every body chunk with its send time, disconnect).
- `RecordingTransport`: an httpx2 transport for the SDK client; records each exchange as the
  client saw it (headers sent, headers received, every body chunk with its arrival time).
- `serve_asgi(app)`: runs an ASGI app under uvicorn (lifespan on) on a free loopback port.

All times are `time.monotonic()`: client, gateway and server share one process and one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from time import monotonic
from typing import Annotated

import httpx2
import uvicorn
from mcp.server.mcpserver import Context
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field

from gateway.devstack.mcp_server import make_server

# --- the server ------------------------------------------------------------------------------


def make_mcp_app(path: str = "/mcp"):
    server = make_server()

    @server.tool()
    async def announce(ctx: Context, text: str) -> str:
        """Send `text` as a log message on the session's standalone stream (not this call's stream)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # logging is deprecated at 2026-07-28; this is the handshake era
            await ctx.session.send_log_message(level="info", data=text, logger="announce", related_request_id=None)
        return "announced"

    @server.tool()
    async def quiet(
        ctx: Context,
        seconds: Annotated[float, Field(ge=0, le=60)],
        heads_up: bool = False,
    ) -> str:
        """Optionally one progress event, then no byte at all for `seconds`, then the answer."""
        if heads_up:
            await ctx.report_progress(0, 1, "going quiet")
        await asyncio.sleep(seconds)
        return f"quiet for {seconds:g}s"

    @server.tool()
    def regional_echo(
        region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})],
        text: str,
    ) -> str:
        """Echo with a routing parameter the 2026 client mirrors into `Mcp-Param-Region`."""
        return f"{region}:{text}"

    # DNS-rebinding protection stays on: a gateway that rewrote Host would get 421.
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*"],
        allowed_origins=["http://127.0.0.1:*"],
    )
    return server.streamable_http_app(streamable_http_path=path, transport_security=security)


# --- recorders ---------------------------------------------------------------------------------


def _lower(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name]


@dataclass
class Exchange:
    """One HTTP exchange as one side saw it."""

    method: str
    path: str
    request_headers: list[tuple[str, str]]
    started: float
    status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_started: float | None = None
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    ended: float | None = None  # the last body byte was sent / EOF was read
    closed: float | None = None  # client side: the response was closed; server side: disconnect seen

    def request_header(self, name: str) -> list[str]:
        return _lower(self.request_headers, name.lower())

    def response_header(self, name: str) -> list[str]:
        return _lower(self.response_headers, name.lower())

    @property
    def body(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    @property
    def content_type(self) -> str:
        values = self.response_header("content-type")
        return values[0].partition(";")[0].strip().lower() if values else ""


class RecordingASGI:
    def __init__(self, app):
        self.app = app
        self.exchanges: list[Exchange] = []

    def paired(self, client_side: Exchange) -> Exchange:
        """The server's record of the exchange the client recorded as `client_side`."""
        tag = client_side.request_header(TAG)
        found = [e for e in self.exchanges if tag and e.request_header(TAG) == tag]
        assert len(found) == 1, f"the upstream received {len(found)} requests tagged {tag} (want 1)"
        return found[0]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rec = Exchange(
            method=scope["method"],
            path=scope["path"],
            request_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            started=monotonic(),
        )
        self.exchanges.append(rec)

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.disconnect" and rec.closed is None:
                rec.closed = monotonic()
            return message

        async def recording_send(message):
            if message["type"] == "http.response.start":
                rec.status = message["status"]
                rec.response_headers = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
                ]
                rec.response_started = monotonic()
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    rec.chunks.append((monotonic(), bytes(message["body"])))
                if not message.get("more_body", False):
                    rec.ended = monotonic()
            await send(message)

        await self.app(scope, recording_receive, recording_send)


class _RecordingStream(httpx2.AsyncByteStream):
    def __init__(self, inner, rec: Exchange):
        self._inner = inner
        self._rec = rec

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            if chunk:
                self._rec.chunks.append((monotonic(), bytes(chunk)))
            yield chunk
        self._rec.ended = monotonic()

    async def aclose(self) -> None:
        if self._rec.closed is None:
            self._rec.closed = monotonic()
        await self._inner.aclose()


TAG = "X-Test-Exchange"


class RecordingTransport(httpx2.AsyncBaseTransport):
    """Also tags every request with `X-Test-Exchange: <n>` so both sides' records can be paired
    (an unknown header the gateway must pass unchanged)."""

    def __init__(self):
        self._inner = httpx2.AsyncHTTPTransport()
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        request.headers[TAG] = f"{id(self):x}-{len(self.exchanges)}"
        rec = Exchange(
            method=request.method,
            path=request.url.raw_path.decode("ascii").partition("?")[0],
            request_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
            started=monotonic(),
        )
        self.exchanges.append(rec)
        response = await self._inner.handle_async_request(request)
        rec.status = response.status_code
        rec.response_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
        rec.response_started = monotonic()
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_RecordingStream(response.stream, rec),
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


# --- running it --------------------------------------------------------------------------------


class _EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals belong to the test process


@contextlib.asynccontextmanager
async def serve_asgi(app) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1:<free port>; yields the port."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1)
    server = _EmbeddedUvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the MCP upstream stopped during startup")
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()
