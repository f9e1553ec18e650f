"""The baseline of a plain aiohttp proxy: one catch-all route and one pooled ClientSession
that forwards method, path, headers and a streamed body to one upstream, and relays
WebSocket messages. No routing, policy, logging or metrics."""

import argparse
import asyncio
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientTimeout, ClientWebSocketResponse, TCPConnector, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from loops import serve

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def client_session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = ClientSession(
        connector=TCPConnector(limit=0),
        auto_decompress=False,
        timeout=ClientTimeout(total=None, sock_connect=5),
        # The upstream sees the client's headers, not aiohttp's defaults.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )
    yield
    await app[SESSION].close()


async def proxy(request: web.Request) -> web.StreamResponse:
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await relay_websocket(request, url)
    body = request.content.iter_any() if request.body_exists else None
    async with request.app[SESSION].request(
        request.method, url, headers=end_to_end(request.headers), data=body, allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=end_to_end(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def relay_websocket(request: web.Request, url: URL) -> web.WebSocketResponse:
    async with request.app[SESSION].ws_connect(url) as upstream:
        client = web.WebSocketResponse()
        await client.prepare(request)
        await asyncio.gather(pipe(client, upstream), pipe(upstream, client))
        return client


async def pipe(source: web.WebSocketResponse | ClientWebSocketResponse,
               sink: web.WebSocketResponse | ClientWebSocketResponse) -> None:
    async for msg in source:
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
    await sink.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    args = parser.parse_args()

    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    serve(app, args.port)


if __name__ == "__main__":
    main()
