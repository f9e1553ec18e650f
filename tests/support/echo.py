"""A real upstream for tests: tells the client what it received, and can misbehave on request.

Request headers that steer it (never forwarded anywhere, only read here):
  X-Echo-Delay: seconds to wait before answering
  X-Echo-Set: "Name: value" response header to add (repeatable)
Paths: /ws (WebSocket echo, with a "close:CODE:REASON" command), /sse?n=&interval=,
/bytes?n= (streams n bytes), /upload (counts the request body), /status/N.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import WSMsgType, web


def make_echo_app(name: str) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        delay = request.headers.get("X-Echo-Delay")
        if delay:
            await asyncio.sleep(float(delay))
        path = request.path
        if path == "/ws" and request.headers.get("Upgrade", "").lower() == "websocket":
            return await websocket(request)
        if path == "/sse":
            return await sse(request)
        if path == "/bytes":
            return await stream_bytes(request)
        if path == "/upload":
            total = 0
            async for chunk in request.content.iter_any():
                total += len(chunk)
            return web.json_response({"backend": name, "received": total})
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]), text="status")
        body = await request.read()
        payload = {
            "backend": name,
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_length": len(body),
            "peer": request.remote,
        }
        response = web.Response(body=json.dumps(payload).encode(), content_type="application/json")
        for item in request.headers.getall("X-Echo-Set", ()):
            key, _, value = item.partition(":")
            response.headers.add(key.strip(), value.strip())
        return response

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"), autoping=True)
        await ws.prepare(request)
        await ws.send_str(json.dumps({"backend": name, "protocol": ws.ws_protocol}))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    break
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        request.app[CLOSE_CODES].append(ws.close_code)
        return ws

    async def sse(request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("n", "3"))
        interval = float(request.query.get("interval", "0.3"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i in range(count):
            await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
            await asyncio.sleep(interval)
        await response.write_eof()
        return response

    async def stream_bytes(request: web.Request) -> web.StreamResponse:
        total = int(request.query["n"])
        chunk = b"x" * 65536
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        sent = 0
        while sent < total:
            piece = chunk[: min(len(chunk), total - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=0)
    app[CLOSE_CODES] = []
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


CLOSE_CODES = web.AppKey("close_codes", list)
