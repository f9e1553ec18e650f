"""WebSocket relay: frames both ways, subprotocol and close codes end to end.

The upstream handshake happens first, so the client is offered exactly the subprotocol the
upstream chose, and an upstream that refuses the upgrade gives its status to the client. Pings
and pongs are relayed as frames rather than answered here, so both ends see each other's.
"""

from __future__ import annotations

import asyncio
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
CLOSE_GRACE = 5.0  # seconds both peers get to answer a close before their connections are cut

_HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions"}
)


@dataclass(frozen=True, slots=True)
class WebSocketLimits:
    idle_timeout: float = 3600.0
    max_lifetime: float = 24 * 3600.0
    max_message_bytes: int = 16 * 1024 * 1024


class OpenSockets:
    """Every relayed socket, so a shutdown can send GOING_AWAY (1001) to all of them.

    A plain dict, not a weak one: a relay removes itself when it ends (`relay` below), and
    10,000 open sockets need no weak references and their callbacks for that."""

    def __init__(self) -> None:
        self._sockets: dict[_Relay, object] = {}

    def __len__(self) -> int:
        return len(self._sockets)

    def add(self, relay: "_Relay", tag: object = None) -> None:
        """`tag` names what the socket reaches (a sandbox), so that it can be closed with it."""
        self._sockets[relay] = tag

    def discard(self, relay: "_Relay") -> None:
        self._sockets.pop(relay, None)

    async def close_tagged(self, tag: object, code: int, reason: str) -> int:
        closes = [relay.start_close(code, reason) for relay, t in list(self._sockets.items()) if t == tag]
        await asyncio.gather(*closes, return_exceptions=True)
        return len(closes)

    async def close_all(self, reason: str = "gateway shutting down") -> None:
        await asyncio.gather(*(relay.start_close(WSCloseCode.GOING_AWAY, reason) for relay in list(self._sockets)),
                             return_exceptions=True)


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
    # aiohttp refuses a message of max_msg_size bytes or more; ours is the largest one allowed.
    max_msg_size = limits.max_message_bytes + 1
    # Offered as the upstream headers have them: on the way to a sandbox, a subprotocol header a
    # policy reads a credential from is gone, so a token sent as a subprotocol never reaches it.
    protocols = [p.strip() for v in plan.headers.getall("Sec-WebSocket-Protocol", ()) for p in v.split(",") if p.strip()]
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
            max_msg_size=max_msg_size,
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
        max_msg_size=max_msg_size,
    )
    try:
        await client.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    link = _Relay(client, upstream, (request.transport, _transport_of(upstream)))
    sockets.add(link, tag)
    try:
        await link.run(limits)
    finally:
        sockets.discard(link)
    return client


class _Relay:
    """One relayed socket. Its objects live as long as the connection, so there are few of
    them: the handler's own task pumps client -> upstream and one task upstream -> client; one
    timer handle watches the idle timeout and the lifetime (re-armed only when it fires, not
    per message). Nothing refers back to the relay but that task and that timer, so a closed
    relay is freed by reference counting, without the garbage collector.

    Every close goes through one task (`_closer`), started by whichever comes first (a close
    frame, a lost peer, the timer, a shutdown): the first code is the one both sides get, and
    the close completes even when aiohttp cancels the handler because the client has gone."""

    __slots__ = ("client", "upstream", "_transports", "_last_activity", "_idle_timeout", "_hard_stop", "_timer",
                 "_closer")

    def __init__(self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                 transports: tuple[asyncio.Transport | None, asyncio.Transport | None]):
        self.client = client
        self.upstream = upstream
        self._transports = transports  # to cut both connections when a close cannot complete
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task | None = None

    async def run(self, limits: WebSocketLimits) -> None:
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        self._idle_timeout = limits.idle_timeout
        self._hard_stop = self._last_activity + limits.max_lifetime
        self._timer = loop.call_at(min(self._last_activity + self._idle_timeout, self._hard_stop), self._on_timer)
        back = asyncio.ensure_future(self._pump(self.upstream, self.client))
        try:
            await self._pump(self.client, self.upstream)
            # The upstream side ends once the close the client side started has reached it.
            await asyncio.gather(back, return_exceptions=True)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            back.cancel()
            await self.close(WSCloseCode.GOING_AWAY, "gateway closed the relay")

    async def _pump(self, source, sink) -> None:
        loop = asyncio.get_running_loop()
        try:
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
                    # Echoed to its sender, and the same code and reason to the other side.
                    code = msg.data if msg.data and msg.data not in _RESERVED else WSCloseCode.OK
                    await self.close(code, msg.extra or "")
                    return
                else:  # CLOSING, CLOSED, ERROR: the source is gone without a close frame
                    if self._closer is not None:
                        return  # a close is under way (ours: timeout, shutdown, the other side's)
                    code = WSCloseCode.MESSAGE_TOO_BIG if _too_big(source, msg) else UPSTREAM_GONE
                    await self.close(code, "peer connection lost")
                    return
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            # The sink went away mid-send: end both sides rather than leave the other pump waiting.
            await self.close(UPSTREAM_GONE if sink is self.client else WSCloseCode.GOING_AWAY, "peer connection lost")

    def _on_timer(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle_at = self._last_activity + self._idle_timeout
        if now >= self._hard_stop:
            self._timer = None
            self.start_close(WSCloseCode.GOING_AWAY, "maximum connection lifetime reached")
        elif now >= idle_at:
            self._timer = None
            self.start_close(WSCloseCode.GOING_AWAY, "idle timeout")
        else:
            self._timer = loop.call_at(min(idle_at, self._hard_stop), self._on_timer)

    def start_close(self, code: int, reason: str) -> asyncio.Task:
        """The close of both sides, started now unless one is under way already."""
        if self._closer is None:
            self._closer = asyncio.ensure_future(self._close_both(code, reason.encode()[:123]))
        return self._closer

    async def close(self, code: int, reason: str) -> None:
        await asyncio.shield(self.start_close(code, reason))

    async def _close_both(self, code: int, message: bytes) -> None:
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await asyncio.gather(
                    *(ws.close(code=code, message=message) for ws in (self.client, self.upstream) if not ws.closed),
                    return_exceptions=True,
                )
        except TimeoutError:
            # A peer that reads nothing keeps the close frame (and what was queued before it)
            # unsent for ever, and a graceful transport close would wait for it: cut both.
            for transport in self._transports:
                if transport is not None:
                    transport.abort()


def _transport_of(upstream: aiohttp.ClientWebSocketResponse) -> asyncio.Transport | None:
    """The upstream connection's transport: aiohttp has no public way to it from a WebSocket."""
    connection = upstream._response.connection  # noqa: SLF001
    return connection.transport if connection is not None else None


def _too_big(ws, msg: aiohttp.WSMessage) -> bool:
    """The source refused a message over the size limit. The server side keeps the error as its
    exception; the client side (the upstream's) hands it over as the ERROR message's data."""
    for exc in (msg.data, ws.exception()):
        if isinstance(exc, aiohttp.WebSocketError) and exc.code == WSCloseCode.MESSAGE_TOO_BIG:
            return True
    return False
