"""The "pod" of the demo sandbox `sandboxes/demo` that `sandgate dev` serves (cluster.py
holds its Sandbox and SandboxClaim): a small agent app, reached through the gateway by `X-Sandbox-*`
headers or the port proxy.

- `POST /chat`: a JSON `{"message": ...}` (or any text) in, a JSON reply naming the sandbox out.
- `GET /ws`: WebSocket echo, each message prefixed with the sandbox's name.
- Anything else: JSON naming the sandbox and describing the request as it arrived (method, raw
  path, header names), so a developer can see that the gateway removed the `X-Sandbox-*`
  headers and the caller's token.
"""

from __future__ import annotations

import json
import weakref

from aiohttp import WSMsgType, web

from gateway.devstack.api import WEBSOCKETS, close_websockets
from gateway.devstack.urls import SANDBOX_NAME, SANDBOX_NAMESPACE

NAME = f"{SANDBOX_NAMESPACE}/{SANDBOX_NAME}"
MAX_MESSAGE = 64 * 1024


async def chat(request: web.Request) -> web.Response:
    text = (await request.read()).decode("utf-8", "replace")  # over MAX_MESSAGE: 413
    try:
        parsed = json.loads(text)
        message = parsed.get("message", text) if isinstance(parsed, dict) else text
    except ValueError:
        message = text
    return web.json_response({"sandbox": NAME, "reply": f"Sandbox {NAME} heard: {message}"})


async def describe(request: web.Request) -> web.Response:
    return web.json_response({
        "sandbox": NAME,
        "method": request.method,
        "path": request.rel_url.raw_path_qs,
        "headers": [name.decode("latin-1") for name, _ in request.raw_headers],
    })


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(f"{NAME}: {message.data}")
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


def make_app() -> web.Application:
    app = web.Application(client_max_size=MAX_MESSAGE)
    app[WEBSOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(close_websockets)
    app.router.add_post("/chat", chat)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", describe)
    return app
