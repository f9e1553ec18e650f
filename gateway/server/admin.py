"""Admin listener (SPEC §6): /healthz, /readyz, /metrics. Never exposed on the public listeners."""

from __future__ import annotations

from typing import Callable

from aiohttp import web

from gateway.server.metrics import Metrics

READY_KEY = web.AppKey("ready", object)


def make_admin_app(metrics: Metrics, readiness: Callable[[], tuple[bool, dict]]) -> web.Application:
    """`readiness()` returns (ready, details); details are shown as JSON for operators."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, details = readiness()
        return web.json_response({"ready": ready, **details}, status=200 if ready else 503)

    async def metrics_endpoint(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": metrics.content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app
