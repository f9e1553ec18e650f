"""WebSocket relay: frames both ways, subprotocol and close codes end to end.

The upstream handshake happens first, so the client is offered exactly the subprotocol the
upstream chose, and an upstream that refuses the upgrade gives its status to the client. Pings
and pongs are relayed as frames rather than answered here, so both ends see each other's.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.proxy.headers import end_to_end
from gateway.proxy.http import ForwardPlan, _as_proxy_error, _tls_arguments
from gateway.refusal import Refusal
from gateway.proxy.upstream import UpstreamPool, upstream_url

# Close codes that must never be sent in a Close frame (RFC 6455 §7.4.1).
_RESERVED = {1005, 1006, 1015}
UPSTREAM_GONE = 1014  # "Bad Gateway" in the IANA close code registry

_HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions"}
)


@dataclass(frozen=True, slots=True)
class WebSocketLimits:
    idle_timeout: float = 3600.0
    max_lifetime: float = 24 * 3600.0
    max_message_bytes: int = 16 * 1024 * 1024


class OpenSockets:
    """Every relayed socket, so a shutdown can send GOING_AWAY (1001) to all of them."""

    def __init__(self) -> None:
        self._sockets: weakref.WeakKeyDictionary[_Relay, object] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._sockets)

    def add(self, relay: "_Relay", tag: object = None) -> None:
        """`tag` names what the socket reaches (a sandbox), so that it can be closed with it."""
        self._sockets[relay] = tag

    async def close_tagged(self, tag: object, code: int, reason: str) -> int:
        relays = [relay for relay, t in list(self._sockets.items()) if t == tag]
        await asyncio.gather(*(relay.close(code, reason) for relay in relays), return_exceptions=True)
        return len(relays)

    async def close_all(self, reason: str = "gateway shutting down") -> None:
        await asyncio.gather(
            *(relay.close(WSCloseCode.GOING_AWAY, reason) for relay in list(self._sockets)),
            return_exceptions=True,
        )


def is_websocket_upgrade(headers) -> bool:
    if headers.get("Upgrade", "").lower() != "websocket":
        return False
    return any(t.strip().lower() == "upgrade" for v in headers.getall("Connection", ()) for t in v.split(","))


async def relay(
    request: web.BaseRequest,
    plan: ForwardPlan,
    pool: UpstreamPool,
    limits: WebSocketLimits,
    sockets: OpenSockets,
    tag: object = None,
) -> web.WebSocketResponse:
    protocols = [p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ()) for p in v.split(",") if p.strip()]
    headers = end_to_end(plan.headers, _HANDSHAKE_HEADERS)
    session = pool.session_for(plan.endpoint)
    try:
        upstream = await session.ws_connect(
            upstream_url(plan.scheme, plan.endpoint, plan.path_and_query),
            method=plan.method,
            protocols=protocols,
            headers=headers,
            autoping=False,
            autoclose=False,
            compress=0,
            max_msg_size=limits.max_message_bytes,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            **_tls_arguments(plan),
        )
    except aiohttp.WSServerHandshakeError as exc:
        if 400 <= exc.status < 600:
            raise Refusal(exc.status, "upstream_refused_upgrade", "The upstream refused the WebSocket upgrade.") from exc
        raise Refusal(502, "upstream_invalid", "The upstream answered the WebSocket upgrade without switching protocols.") from exc
    except BaseException as exc:  # noqa: BLE001
        raise _as_proxy_error(exc) from exc
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoping=False,
        autoclose=False,
        compress=False,
        max_msg_size=limits.max_message_bytes,
    )
    try:
        await client.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    link = _Relay(client, upstream)
    sockets.add(link, tag)
    await link.run(limits)
    return client


class _Relay:
    def __init__(self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse):
        self.client = client
        self.upstream = upstream
        self._closed = False
        self._last_activity = 0.0

    async def run(self, limits: WebSocketLimits) -> None:
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        pumps = [
            asyncio.ensure_future(self._pump(self.client, self.upstream)),
            asyncio.ensure_future(self._pump(self.upstream, self.client)),
        ]
        watchdog = asyncio.ensure_future(self._watch(limits, loop.time() + limits.max_lifetime))
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watchdog.cancel()
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, watchdog, return_exceptions=True)
            await self.close(WSCloseCode.GOING_AWAY, "gateway closed the relay")

    async def _pump(self, source, sink) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await source.receive()
            self._last_activity = loop.time()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif kind is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif kind is WSMsgType.PING:
                await sink.ping(msg.data)
            elif kind is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif kind is WSMsgType.CLOSE:
                await self._close_pair(source, sink, msg.data, msg.extra or "")
                return
            else:  # CLOSING, CLOSED, ERROR: the source is gone without a close frame
                if self._closed:
                    return  # we closed it ourselves (timeout, shutdown): the close is under way
                code = WSCloseCode.MESSAGE_TOO_BIG if _too_big(source) else UPSTREAM_GONE
                await self._close_pair(source, sink, code, "peer connection lost")
                return

    async def _close_pair(self, source, sink, code: int, reason: str) -> None:
        """Echo the close to its sender and pass the same code and reason to the other side."""
        self._closed = True
        code = code if code and code not in _RESERVED else WSCloseCode.OK
        await asyncio.gather(
            sink.close(code=code, message=reason.encode()[:123]),
            source.close(code=code, message=reason.encode()[:123]),
            return_exceptions=True,
        )

    async def _watch(self, limits: WebSocketLimits, hard_stop: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            idle_at = self._last_activity + limits.idle_timeout
            if now >= hard_stop:
                await self.close(WSCloseCode.GOING_AWAY, "maximum connection lifetime reached")
                return
            if now >= idle_at:
                await self.close(WSCloseCode.GOING_AWAY, "idle timeout")
                return
            await asyncio.sleep(min(idle_at, hard_stop) - now)

    async def close(self, code: int, reason: str) -> None:
        """Close whichever side is still open (both, unless a close is already under way)."""
        self._closed = True
        message = reason.encode()[:123]
        await asyncio.gather(
            *(ws.close(code=code, message=message) for ws in (self.client, self.upstream) if not ws.closed),
            return_exceptions=True,
        )


def _too_big(ws) -> bool:
    exc = ws.exception()
    return isinstance(exc, aiohttp.WebSocketError) and exc.code == WSCloseCode.MESSAGE_TOO_BIG
