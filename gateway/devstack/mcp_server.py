"""Stand-in for the platform's MCP server (Service `mcp.platform:8000`).

A real server from the official `mcp` SDK (2.x `MCPServer`) on the streamable HTTP transport at
`/mcp`, in its stateful mode, so clients of both eras work: the initialize handshake with
`Mcp-Session-Id` and the 2026 stateless requests. Tools:

- `echo(text)` returns the text; `add(a, b)` returns the sum;
- `slow_count(n, delay)` counts to n, sending a progress notification per step;
- `request_headers()` returns the HTTP headers this server received (what the gateway forwarded).

Also `GET /healthz` and the RFC 9728 protected-resource metadata at
`/.well-known/oauth-protected-resource[/mcp]` (resource = the public MCP URL, authorization
server = the public origin, where the API stand-in serves RFC 8414 metadata).

`make_app` returns an ASGI (Starlette) app whose lifespan runs the SDK's session manager; serve
it with a server that runs lifespans (uvicorn does, see `runner.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from yarl import URL

from gateway.devstack.urls import MCP_SCOPE, MCP_SERVICE, public_origin

MCP_PATH = "/mcp"
MAX_COUNT = 50
MAX_DELAY = 2.0


def protected_resource_metadata(origin: str) -> dict:
    return {
        "resource": f"{origin}{MCP_PATH}",
        "authorization_servers": [origin],
        "bearer_methods_supported": ["header"],
        "scopes_supported": [MCP_SCOPE],
        "resource_name": "Sandgate dev MCP server",
    }


def _transport_security(origin: str) -> TransportSecuritySettings:
    """DNS-rebinding protection that still admits requests through the gateway.

    The gateway keeps `Host` (SPEC 3.1), so the server sees the public host as well as loopback
    and its cluster name.
    """
    public = URL(origin)
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", f"{MCP_SERVICE.rsplit(':', 1)[0]}:*"]
    public_host = public.raw_host if ":" not in public.raw_host else f"[{public.raw_host}]"
    hosts += [public_host, f"{public_host}:*"]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*", origin]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


@contextmanager
def _keep_root_logging() -> Iterator[None]:
    # MCPServer() calls logging.basicConfig(); the host process owns its logging setup.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def make_server() -> MCPServer:
    with _keep_root_logging():
        server = MCPServer("sandgate-dev-mcp", instructions="Stand-in MCP server of `sandgate dev`.")

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    async def slow_count(
        ctx: Context,
        n: Annotated[int, Field(ge=1, le=MAX_COUNT)] = 5,
        delay: Annotated[float, Field(ge=0, le=MAX_DELAY)] = 0.5,
    ) -> str:
        """Count to n, one step per `delay` seconds, reporting progress at every step."""
        for step in range(1, n + 1):
            await ctx.report_progress(step, n, f"step {step} of {n}")
            if step < n:
                await asyncio.sleep(delay)
        return f"counted to {n}"

    @server.tool()
    def request_headers(ctx: Context) -> list[list[str]]:
        """The HTTP headers of this call as the server received them, in order."""
        headers = ctx.headers
        return [[name, value] for name, value in headers.items()] if headers is not None else []

    return server


def make_app(public_url: str) -> Starlette:
    origin = public_origin(public_url)
    server = make_server()
    metadata = protected_resource_metadata(origin)

    @server.custom_route("/healthz", methods=["GET"])
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @server.custom_route("/.well-known/oauth-protected-resource", methods=["GET"])
    @server.custom_route(f"/.well-known/oauth-protected-resource{MCP_PATH}", methods=["GET"])
    async def resource_metadata(request: Request) -> JSONResponse:
        return JSONResponse(metadata)

    return server.streamable_http_app(streamable_http_path=MCP_PATH, transport_security=_transport_security(origin))
