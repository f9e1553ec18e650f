"""Starts the stand-ins on free loopback ports in the caller's event loop, and stops them."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import uvicorn
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from gateway.devstack import api, cluster, demo_sandbox, frontend, mcp_server
from gateway.devstack.urls import API_SERVICE, FRONTEND_SERVICE, MCP_SERVICE, public_origin

Stop = Callable[[], Awaitable[None]]

# Seconds an in-flight request (an SSE stream, an open WebSocket) may take to finish on stop.
SHUTDOWN_TIMEOUT = 1


@dataclass
class Devstack:
    """The running stand-ins. `services` maps each cluster address to its loopback (host, port);
    `sandbox` is the demo sandbox's pod address, `kube_api` the Kubernetes API stand-in."""

    public_url: str
    services: dict[str, tuple[str, int]]
    sandbox: tuple[str, int] = ("", 0)
    kube_api: str = ""
    kube_token: str = field(default="", repr=False)
    signing_key: rsa.RSAPrivateKey | None = field(default=None, repr=False)  # the API stand-in's
    _stops: list[Stop] = field(default_factory=list, repr=False)

    def write_kubeconfig(self, path) -> str:
        """A kubeconfig for the Kubernetes API stand-in (what `--kubeconfig` reads)."""
        return str(cluster.write_kubeconfig(path, self.kube_api, self.kube_token))

    async def stop(self) -> None:
        stops, self._stops = self._stops, []
        for stop in reversed(stops):
            await stop()


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside a host process: SIGTERM/SIGINT belong to the host (the gateway's drain)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str) -> socket.socket:
    # Bound here, port 0, so the port is known before any server starts and nothing can take it.
    sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setblocking(False)
    return sock


async def _serve_aiohttp(app: web.Application, sock: socket.socket, *, handler_cancellation: bool = False) -> Stop:
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT, handler_cancellation=handler_cancellation
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner.cleanup


async def _serve_asgi(app: Callable, sock: socket.socket) -> Stop:
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,
    )
    server = _EmbeddedUvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()
            raise RuntimeError("the MCP stand-in stopped during startup")
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await task

    return stop


async def start_devstack(public_url: str, host: str = "127.0.0.1") -> Devstack:
    """Start the API, MCP and frontend stand-ins on free ports of `host`, the demo sandbox on a
    free port of its pod IP (127.0.0.1), and the Kubernetes API stand-in that lists it.

    `public_url` is the gateway's public origin: it becomes the OAuth issuer and the MCP resource
    URL in the stand-ins' metadata. Call `stop()` on the result when done.
    """
    origin = public_origin(public_url)
    stack = Devstack(public_url=origin, services={}, kube_token=secrets.token_urlsafe(32))
    try:
        sandbox_sock = _listen(cluster.POD_IP)
        stack.sandbox = (cluster.POD_IP, sandbox_sock.getsockname()[1])
        stack._stops.append(await _serve_aiohttp(demo_sandbox.make_app(), sandbox_sock))
        kube_sock = _listen(host)
        kube_app = cluster.make_app(api.SUBJECT, stack.kube_token)
        stack._stops.append(await _serve_aiohttp(kube_app, kube_sock, handler_cancellation=True))
        kube_host, kube_port = kube_sock.getsockname()[:2]
        stack.kube_api = str(URL.build(scheme="http", host=kube_host, port=kube_port))
        api_app = api.make_app(origin)
        stack.signing_key = api_app[api.SIGNING_KEY]
        starts: list[tuple[str, Callable[[socket.socket], Awaitable[Stop]]]] = [
            (API_SERVICE, lambda sock: _serve_aiohttp(api_app, sock)),
            (MCP_SERVICE, lambda sock: _serve_asgi(mcp_server.make_app(origin), sock)),
            (FRONTEND_SERVICE, lambda sock: _serve_aiohttp(frontend.make_app(origin, stack.sandbox[1]), sock)),
        ]
        for service, start in starts:
            sock = _listen(host)
            port = sock.getsockname()[1]
            stack._stops.append(await start(sock))
            stack.services[service] = (host, port)
    except BaseException:
        await stack.stop()
        raise
    return stack
