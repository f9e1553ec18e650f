"""The aiohttp origin of the benchmark: `/ws` echoes WebSocket messages, every other path
answers 200 with a fixed text body (the HTTP origin only when nginx is not installed)."""

import argparse
import gc

from aiohttp import WSMsgType, web

from loops import serve


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-bytes", type=int, default=200)
    parser.add_argument("--gc-off", action="store_true",
                        help="no garbage collection (many_websockets.py: with 10,000 sockets open the origin's own "
                             "collections would stall every echo and be counted against the gateway)")
    args = parser.parse_args()
    if args.gc_off:
        gc.disable()

    body = b"x" * args.body_bytes

    async def plain(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_route("*", "/{tail:.*}", plain)
    serve(app, args.port)


if __name__ == "__main__":
    main()
