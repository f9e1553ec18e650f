"""WebSockets through a running gateway to a real echo upstream (SPEC §3.2, §6 gauge).

Frames both ways, subprotocols end to end, close codes in both directions, ping/pong relayed,
idle timeout, maximum lifetime, 1001 on shutdown, a refused upgrade, the message size limit (both
directions, whole or in fragments), back-pressure against a peer that never reads and the
open-socket gauge.
"""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from prometheus_client.parser import text_string_to_metric_families

from gateway.proxy.websocket import CLOSE_GRACE, WebSocketLimits, _Relay
from gateway.server.handler import Settings
from tests.support.echo import CLOSE_CODES
from tests.support.harness import admin_url, echo_routes, running_gateway, url
from tests.support.rawhttp import raw_connection, request

ROUTE = "infra/echo"
STEP = 5.0  # bound on any single wait; a healthy run needs milliseconds


@pytest.fixture
async def upstream(echo_servers):
    """(port, close codes the echo upstream saw)."""
    servers = await echo_servers("echo")
    return servers["echo"][1], echo_servers.servers["echo"].app[CLOSE_CODES]


async def receive(ws, timeout: float = STEP):
    return await asyncio.wait_for(ws.receive(), timeout)


async def hello(ws) -> dict:
    msg = await receive(ws)
    assert msg.type is WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def wait_until(predicate, timeout: float = STEP, what: str = "condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_text_and_binary_frames_both_ways(upstream, tmp_path):
    port, _ = upstream
    async with running_gateway(tmp_path, echo_routes(port)) as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(gw, "/ws")) as ws:
            assert (await hello(ws))["backend"] == "echo"
            await ws.send_str("héllo wörld")
            msg = await receive(ws)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, "héllo wörld")
            payload = bytes(range(256)) * 4096  # 1 MiB, several TCP segments
            await ws.send_bytes(payload)
            msg = await receive(ws)
            assert msg.type is WSMsgType.BINARY
            assert msg.data == payload
            await ws.send_bytes(b"")
            msg = await receive(ws)
            assert (msg.type, msg.data) == (WSMsgType.BINARY, b"")


@pytest.mark.parametrize(
    "offered,expected",
    [(("chat.v1",), "chat.v1"), (("chat.v2",), "chat.v2"), ((), None), (("chat.v9",), None)],
)
async def test_subprotocol_negotiated_end_to_end(upstream, tmp_path, offered, expected):
    port, _ = upstream
    async with running_gateway(tmp_path, echo_routes(port)) as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(gw, "/ws"), protocols=offered) as ws:
            assert ws.protocol == expected  # what the gateway answered the client
            assert (await hello(ws))["protocol"] == expected  # what the upstream chose


async def test_upstream_close_code_and_reason_reach_the_client(upstream, tmp_path):
    port, _ = upstream
    async with running_gateway(tmp_path, echo_routes(port)) as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(gw, "/ws"), autoclose=False) as ws:
            await hello(ws)
            await ws.send_str("close:4001:bye")
            msg = await receive(ws)
            assert msg.type is WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (4001, "bye")


async def test_client_close_code_reaches_the_upstream(upstream, tmp_path):
    port, close_codes = upstream
    async with running_gateway(tmp_path, echo_routes(port)) as gw, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url(gw, "/ws"))
        await hello(ws)
        await asyncio.wait_for(ws.close(code=4002, message=b"client leaving"), STEP)
        await wait_until(lambda: close_codes, what="the upstream to see the close")
        assert close_codes == [4002]


async def test_ping_from_client_comes_back_as_relayed_pong(upstream, tmp_path):
    port, _ = upstream
    async with running_gateway(tmp_path, echo_routes(port)) as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(gw, "/ws"), autoping=False) as ws:
            await hello(ws)
            await ws.ping(b"are-you-there")
            msg = await receive(ws)
            # The upstream answers the ping; the gateway relays its pong with the same payload.
            assert (msg.type, msg.data) == (WSMsgType.PONG, b"are-you-there")


async def test_idle_timeout_closes_both_sides_but_activity_keeps_it_open(upstream, tmp_path):
    port, close_codes = upstream
    settings = Settings(websocket=WebSocketLimits(idle_timeout=0.5))
    async with running_gateway(tmp_path, echo_routes(port), settings=settings) as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(gw, "/ws")) as ws:
            await hello(ws)
            loop = asyncio.get_running_loop()
            busy_until = loop.time() + 1.2  # more than twice the idle timeout
            while loop.time() < busy_until:
                await ws.send_str("tick")
                assert (await receive(ws)).data == "tick"
                await asyncio.sleep(0.1)
            quiet_from = loop.time()
            msg = await receive(ws, timeout=3.0)
            assert msg.type is WSMsgType.CLOSE, msg
            assert loop.time() - quiet_from >= 0.4
            await wait_until(lambda: close_codes, what="the upstream to be closed")
            # Both sides are told the same thing: the gateway closed an idle socket.
            assert close_codes == [msg.data]


async def test_max_lifetime_closes_an_active_socket(upstream, tmp_path):
    port, close_codes = upstream
    settings = Settings(websocket=WebSocketLimits(idle_timeout=60, max_lifetime=1.0))
    async with running_gateway(tmp_path, echo_routes(port), settings=settings) as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(gw, "/ws")) as ws:
            loop = asyncio.get_running_loop()
            opened = loop.time()
            await hello(ws)
            closed = None

            async def keep_talking():
                while not ws.closed:
                    try:
                        await ws.send_str("still here")
                    except (ConnectionError, RuntimeError):
                        return
                    await asyncio.sleep(0.05)

            talker = asyncio.ensure_future(keep_talking())
            try:
                while loop.time() - opened < 4.0:
                    msg = await receive(ws)
                    if msg.type is not WSMsgType.TEXT:
                        assert msg.type is WSMsgType.CLOSE, msg
                        closed = loop.time() - opened
                        code = msg.data
                        break
                    assert msg.data == "still here"
            finally:
                talker.cancel()
            assert closed is not None, "an active socket outlived its maximum lifetime"
            assert 0.9 <= closed < 3.0
            await wait_until(lambda: close_codes, what="the upstream to be closed")
            assert close_codes == [code]


async def test_drain_sends_going_away_to_open_sockets(upstream, tmp_path):
    port, close_codes = upstream
    async with running_gateway(tmp_path, echo_routes(port)) as gw, aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(url(gw, "/ws"), autoclose=False) for _ in range(2)]
        for ws in sockets:
            await hello(ws)
        drain = asyncio.ensure_future(gw.drain())
        for ws in sockets:
            msg = await receive(ws)
            assert msg.type is WSMsgType.CLOSE
            assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
            await ws.close()
        await asyncio.wait_for(drain, STEP)
        await wait_until(lambda: len(close_codes) == 2, what="the upstream sockets to be closed")
        assert close_codes == [1001, 1001]


async def test_upstream_refusing_the_upgrade_gives_its_status(upstream, tmp_path):
    port, _ = upstream
    async with running_gateway(tmp_path, echo_routes(port)) as gw, aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url(gw, "/status/403"))
        assert refused.value.status == 403
        # and the gateway keeps relaying for others
        async with session.ws_connect(url(gw, "/ws")) as ws:
            assert (await hello(ws))["backend"] == "echo"


async def test_message_over_the_limit_closes_with_1009(upstream, tmp_path):
    port, close_codes = upstream
    settings = Settings(websocket=WebSocketLimits(max_message_bytes=64 * 1024))
    async with running_gateway(tmp_path, echo_routes(port), settings=settings) as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(gw, "/ws"), autoclose=False) as ws:
            await hello(ws)
            await ws.send_bytes(b"x" * (64 * 1024 - 1024))  # under the limit: relayed
            assert len((await receive(ws)).data) == 64 * 1024 - 1024
            await ws.send_bytes(b"x" * (64 * 1024 + 1))
            msg = await receive(ws)
            assert msg.type is WSMsgType.CLOSE, msg
            assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        # The upstream's half must not be left open (a leaked socket per oversized message).
        await wait_until(lambda: close_codes, what="the upstream to be closed")


def _gauge(text: str, route: str) -> float | None:
    for family in text_string_to_metric_families(text):
        if family.name == "sandgate_websocket_connections":
            for sample in family.samples:
                if sample.labels.get("route") == route:
                    return sample.value
    return None


async def test_websocket_gauge_goes_up_and_back_down(upstream, tmp_path):
    port, _ = upstream
    async with running_gateway(tmp_path, echo_routes(port)) as gw, aiohttp.ClientSession() as session:

        async def gauge() -> float | None:
            async with session.get(admin_url(gw, "/metrics")) as resp:
                assert resp.status == 200
                return _gauge(await resp.text(), ROUTE)

        first = await session.ws_connect(url(gw, "/ws"))
        second = await session.ws_connect(url(gw, "/ws"))
        await hello(first)
        await hello(second)
        assert await gauge() == 2
        await first.close()
        deadline = asyncio.get_running_loop().time() + STEP
        while await gauge() != 1:
            assert asyncio.get_running_loop().time() < deadline, "gauge did not drop to 1"
            await asyncio.sleep(0.02)
        await second.close()
        while await gauge() != 0:
            assert asyncio.get_running_loop().time() < deadline, "gauge did not drop to 0"
            await asyncio.sleep(0.02)


# --- hostile peers: oversized messages, floods into a peer that never reads ------------------

CHUNK = 256 * 1024  # one flood message
STALLED = 1.0  # a send that waits this long has met back-pressure
LIMIT = 48 * 1024


def _hostile_upstream_app() -> web.Application:
    """/big?bytes=N sends one message of N bytes; /sink never reads; /flood sends CHUNK-sized
    messages until a send stalls (or FLOOD_MAX is sent) and records how many bytes it got out."""
    app = web.Application()
    app[CLOSE_CODES] = []
    app[FLOODED] = []
    app[RELEASE] = asyncio.Event()

    async def big(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"b" * int(request.query["bytes"]))
        async for _ in ws:
            pass
        app[CLOSE_CODES].append(ws.close_code)
        return ws

    async def sink(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await app[RELEASE].wait()  # never reads
        return ws

    async def flood(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        app[FLOODED].append(await _flood(ws))
        await app[RELEASE].wait()
        return ws

    app.router.add_get("/big", big)
    app.router.add_get("/sink", sink)
    app.router.add_get("/flood", flood)
    return app


FLOODED = web.AppKey("flooded", list)
RELEASE = web.AppKey("release", asyncio.Event)  # set when the test ends: the handlers that wait return
FLOOD_MAX = 256 * 1024 * 1024


async def _flood(ws) -> int:
    """Bytes sent before one send stalled for STALLED seconds (or FLOOD_MAX if none did)."""
    payload, sent = b"f" * CHUNK, 0
    while sent < FLOOD_MAX:
        try:
            await asyncio.wait_for(ws.send_bytes(payload), STALLED)
        except TimeoutError:
            return sent
        sent += CHUNK
    return sent


@pytest.fixture
async def hostile_upstream(aiohttp_server):
    server = await aiohttp_server(_hostile_upstream_app(), host="127.0.0.1")
    yield server.port, server.app
    server.app[RELEASE].set()


@pytest.mark.parametrize("over", [1, 40_000])
async def test_message_from_the_upstream_over_the_limit_closes_with_1009(hostile_upstream, tmp_path, over):
    port, app = hostile_upstream
    settings = Settings(websocket=WebSocketLimits(max_message_bytes=LIMIT))
    async with running_gateway(tmp_path, echo_routes(port), settings=settings) as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(gw, f"/big?bytes={LIMIT}"), max_msg_size=0) as ws:
            assert len((await receive(ws)).data) == LIMIT  # at the limit: relayed
        async with session.ws_connect(url(gw, f"/big?bytes={LIMIT + over}"), max_msg_size=0, autoclose=False) as ws:
            msg = await receive(ws)
            assert msg.type is WSMsgType.CLOSE, msg
            assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await wait_until(lambda: len(app[CLOSE_CODES]) == 2, what="the upstream sockets to be closed")
        assert app[CLOSE_CODES][1] == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await wait_until(lambda: len(gw.gateway.sockets) == 0, what="the relays to end")


def _frame(opcode: int, payload: bytes, fin: bool) -> bytes:
    """A masked client frame (RFC 6455 §5.2), the mask all zero: the payload goes as is."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536 \
        else bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([first]) + length + b"\0\0\0\0" + payload


async def test_fragments_adding_up_to_more_than_the_limit_close_with_1009(upstream, tmp_path):
    """Each fragment is small; the message they make is not: it is refused before it is whole."""
    port, close_codes = upstream
    settings = Settings(websocket=WebSocketLimits(max_message_bytes=LIMIT))
    async with running_gateway(tmp_path, echo_routes(port), settings=settings) as gw, raw_connection(gw) as (reader, writer):
        writer.write(request("GET /ws HTTP/1.1", "Host: echo.local", "Upgrade: websocket", "Connection: Upgrade",
                             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        fragment = b"a" * 1000
        writer.write(_frame(0x1, fragment, fin=False))
        for _ in range(LIMIT // len(fragment) + 2):
            writer.write(_frame(0x0, fragment, fin=False))
        await writer.drain()
        frames = b""
        while b"\x88" not in frames and (more := await reader.read(65536)):  # the upstream's hello, then a close
            frames += more
        close_at = frames.find(b"\x88")
        assert close_at >= 0, frames[:200]
        assert int.from_bytes(frames[close_at + 2:close_at + 4], "big") == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await wait_until(lambda: close_codes, what="the upstream to be closed")
        assert close_codes == [aiohttp.WSCloseCode.MESSAGE_TOO_BIG]


@pytest.mark.parametrize("flooder", ["client", "upstream"])
async def test_a_peer_that_never_reads_holds_back_the_other_side(hostile_upstream, tmp_path, flooder):
    """The gateway stops reading from the flooding side while the other side does not read:
    the flood stalls, and the gateway (and everything in this process) holds a bounded amount
    of it, not the gigabytes an unbounded queue would let through. Shutting down does not wait
    for ever on the stuck sockets either."""
    port, app = hostile_upstream
    settings = Settings(websocket=WebSocketLimits(max_message_bytes=1024 * 1024))
    async with aiohttp.ClientSession() as session:
        async with running_gateway(tmp_path, echo_routes(port), settings=settings) as gw:
            tracemalloc.start()
            try:
                ws = await session.ws_connect(url(gw, "/sink" if flooder == "client" else "/flood"))
                if flooder == "client":
                    sent = await _flood(ws)
                else:  # ws is never read from (but kept: a dropped one would discard what arrives)
                    await wait_until(lambda: app[FLOODED], timeout=60, what="the upstream's flood to stall")
                    sent = app[FLOODED][0]
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            # Loopback socket buffers take some of the flood (up to tcp_rmem/tcp_wmem per
            # socket); the process itself holds a few messages at most.
            assert sent < FLOOD_MAX, "the flood never stalled"
            assert peak < 32 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held while {sent / 2**20:.0f} MiB were sent"
            await asyncio.wait_for(gw.drain(), CLOSE_GRACE + STEP)


async def test_closed_relays_are_freed_without_the_garbage_collector(upstream, tmp_path):
    """The gateway moves long-lived objects out of the collector's view (gc_tuning), so a relay
    that left a reference cycle behind would stay in memory for good: closed relays, however
    they closed, must go by reference counting alone."""
    port, close_codes = upstream
    settings = Settings(websocket=WebSocketLimits(idle_timeout=1.0))
    async with running_gateway(tmp_path, echo_routes(port), settings=settings) as gw, aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(url(gw, "/ws"), autoclose=False) for _ in range(9)]
        for ws in sockets:
            await hello(ws)
        gc.disable()
        try:
            gc.freeze()  # what the gateway does with whatever lives longer than a second
            client_closes, upstream_closes, idle = sockets[:3], sockets[3:6], sockets[6:]
            for ws in client_closes:
                await ws.close(code=4000)
            for ws in upstream_closes:
                await ws.send_str("close:4001:bye")
            for ws in upstream_closes + idle:  # the idle ones are closed by the gateway's timer
                assert (await receive(ws)).type is WSMsgType.CLOSE
                await ws.close()
            await wait_until(lambda: len(gw.gateway.sockets) == 0, what="the relays to end")
            await wait_until(lambda: len(close_codes) == len(sockets), what="the upstream sockets to close")
            await asyncio.sleep(0.1)  # the handlers' last steps
            gc.unfreeze()
            left = [o for o in gc.get_objects() if isinstance(o, _Relay)]
        finally:
            gc.unfreeze()
            gc.enable()
        assert left == [], f"{len(left)} closed relays are kept alive by reference cycles"
