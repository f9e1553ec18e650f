"""WebSockets through a running gateway to a real echo upstream (SPEC §3.2, §6 gauge).

Frames both ways, subprotocols end to end, close codes in both directions, ping/pong relayed,
idle timeout, maximum lifetime, 1001 on shutdown, a refused upgrade, the message size limit and
the open-socket gauge.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import WSMsgType
from prometheus_client.parser import text_string_to_metric_families

from gateway.proxy.websocket import WebSocketLimits
from gateway.server.handler import Settings
from tests.support.echo import CLOSE_CODES
from tests.support.harness import admin_url, echo_routes, running_gateway, url

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
