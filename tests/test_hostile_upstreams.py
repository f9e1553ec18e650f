"""Hostile upstreams, on raw sockets behind a running gateway (SPEC §3.1 "Limits hold while
reading", §3.3): a sandbox pod is anyone's code, so what an upstream sends is bounded like what a
client sends. Over-long response heads are a 502 and the upstream connection is dropped; an
over-long chunked framing cuts the response; a head trickled forever ends in a 504.

Memory is measured as in test_hostile_connections: the gateway runs in this process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from time import monotonic

import aiohttp
import pytest

from gateway.proxy.h1limits import ChunkedFraming, ResponseLimits, ResponseRefused
from gateway.server.handler import Settings
from tests.support.harness import GATEWAY, backend, route_to, running_gateway, url
from tests.support.rawhttp import raw_connection, read_response, request
from tests.support.rawupstream import OK, answer, raw_upstream  # noqa: F401 - a fixture
from tests.test_hostile_connections import MiB, address, peak_rss_since_reset, reset_peak_rss


def routes_to(server) -> str:
    return GATEWAY + backend("up", server.sockets[0].getsockname()[1]) + route_to("up")


async def get(gw, path: str = "/", timeout: float = 20):
    """One response on a fresh raw connection (whose reader takes heads larger than 64 KiB)."""
    host, port = address(gw)
    reader, writer = await asyncio.open_connection(host, port, limit=MiB)
    try:
        writer.write(request(f"GET {path} HTTP/1.1", f"Host: {host}:{port}"))
        return await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()


async def assert_upstream_closed(server, connections: int = 1) -> None:
    for _ in range(100):
        if len(server.closed) >= connections:
            break
        await asyncio.sleep(0.1)
    assert server.closed[:connections] == [True] * connections, "the upstream connection was kept"


def assert_upstream_invalid(response) -> None:
    assert response.status == 502, (response.status, response.body[:200])
    body = response.json()
    assert body["error"] == "upstream_invalid" and body["message"] and body["request_id"], body


def head_of(size: int, status_line: bytes = b"HTTP/1.1 200 OK\r\n", line: int = 8000) -> bytes:
    """A response head of exactly `size` bytes (blank line included) with Content-Length: 2,
    padded with header lines of at most `line` bytes."""
    start = status_line + b"Content-Length: 2\r\n"
    lines, filler = [], size - len(start) - 2
    while filler > 0:
        part = min(filler, line)
        if 0 < filler - part < 12:  # leave the last line room for its name
            part -= 12
        name = f"X-P{len(lines)}: ".encode()
        lines.append(name + b"v" * (part - len(name) - 2) + b"\r\n")
        filler -= part
    head = start + b"".join(lines) + b"\r\n"
    assert len(head) == size
    return head


# --- the response head, bounded while reading ------------------------------------------------


@pytest.mark.parametrize("hostile", [
    pytest.param(head_of(200 * 1024) + b"ok", id="header lines past the head limit"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-Long: " + b"l" * (20 * 1024) + b"\r\nContent-Length: 2\r\n\r\nok",
                 id="one header line over 16 KiB"),
    pytest.param(b"HTTP/1.1 200 " + b"R" * (20 * 1024) + b"\r\nContent-Length: 2\r\n\r\nok", id="a huge reason phrase"),
    pytest.param(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(300)) + b"Content-Length: 2\r\n\r\nok",
                 id="300 tiny headers"),
    pytest.param(b"HTTP/1.1 200 OK\n" + (b"X-A: " + b"a" * 5000 + b"\n") * 30 + b"\n", id="bare LF lines"),
    pytest.param(b"HTTP/1.1 103 Early Hints\r\n" + head_of(90 * 1024)[len(b"HTTP/1.1 200 OK\r\n"):] + OK,
                 id="an interim head past the limit"),
])
async def test_an_over_long_response_head_is_502_and_the_upstream_connection_dropped(raw_upstream, tmp_path, hostile):
    upstream = await raw_upstream(answer(hostile, piece=4096))
    async with running_gateway(tmp_path, routes_to(upstream)) as gw:
        assert_upstream_invalid(await get(gw))
        await assert_upstream_closed(upstream)
        healthy = await get(gw, "/healthy")  # the gateway still serves, on a fresh connection
        assert (healthy.status, healthy.body) == (200, b"ok")


@pytest.mark.parametrize("limit", [20 * 1024, 64 * 1024])
async def test_a_response_head_at_the_limit_passes_and_one_byte_over_is_502(raw_upstream, tmp_path, limit):
    """The count is exact for the status line plus headers, however the upstream splits them;
    the limit is the client-side header limit (Settings.max_header_bytes)."""
    settings = Settings(max_header_bytes=limit)
    for size, status in ((limit, 200), (limit + 1, 502)):
        for piece in (0, 1000, 7):
            upstream = await raw_upstream(answer(head_of(size) + b"ok", piece=piece))
            directory = tmp_path / f"{size}-{piece}"
            directory.mkdir()
            async with running_gateway(directory, routes_to(upstream), settings=settings) as gw:
                response = await get(gw)
            assert response.status == status, (size, piece, response.body[:200])
            if status == 200:
                assert response.body == b"ok"
            else:
                assert_upstream_invalid(response)


async def test_a_response_nobody_asked_for_closes_the_upstream_connection(raw_upstream, tmp_path):
    """A second response in the same write as the first (here with a huge head): the first is
    served, the connection is dropped, and the next request goes out on a fresh one."""
    upstream = await raw_upstream(answer(OK + head_of(200 * 1024)))
    async with running_gateway(tmp_path, routes_to(upstream)) as gw:
        response = await get(gw)
        assert (response.status, response.body) == (200, b"ok")
        await assert_upstream_closed(upstream)
        assert (await get(gw, "/healthy")).status == 200


@pytest.mark.parametrize("line_limit", [16 * 1024, 6 * 1024])
async def test_a_header_line_at_the_line_limit_passes_and_one_byte_over_is_502(raw_upstream, tmp_path, line_limit):
    """One header line (name and value) is held to the client-side line limit."""
    for size, status in ((line_limit, 200), (line_limit + 1, 502)):
        value = b"l" * (size - len(b"X-Long"))
        upstream = await raw_upstream(answer(b"HTTP/1.1 200 OK\r\nX-Long: " + value + b"\r\nContent-Length: 2\r\n\r\nok"))
        directory = tmp_path / str(size)
        directory.mkdir()
        async with running_gateway(directory, routes_to(upstream), settings=Settings(max_header_line_bytes=line_limit)) as gw:
            response = await get(gw)
        assert response.status == status, (size, response.body[:200])
        if status == 200:
            assert response.header("X-Long") == value.decode()


async def test_twenty_huge_response_heads_in_flight_keep_memory_bounded(raw_upstream, tmp_path):
    """20 requests at once, each answered by an upstream trickling header lines (each under the
    line limit) towards 4 MiB: each is a 502, and the gateway grows by far less than was sent."""
    line = b"X-Filler: " + b"f" * 8000 + b"\r\n"
    hostile = b"HTTP/1.1 200 OK\r\n" + line * (4 * MiB // len(line))
    upstream = await raw_upstream(answer(hostile, piece=len(line), pause=0.002))
    async with running_gateway(tmp_path, routes_to(upstream)) as gw:
        before = reset_peak_rss()
        responses = await asyncio.gather(*(get(gw, f"/{i}", 60) for i in range(20)))
        grown = peak_rss_since_reset() - before
        for response in responses:
            assert_upstream_invalid(response)
        await assert_upstream_closed(upstream, 20)
        # Without the bound each response makes the gateway hold its 2 MiB of header lines (256
        # lines of 8 KB) several times over; with it about 64 KiB each, counted generously.
        assert grown < 20 * 64 * 1024 * 8 + 8 * MiB, f"the gateway grew by {grown / MiB:.1f} MiB"
        assert (await get(gw, "/healthy")).status == 200


# --- the response head, bounded in time ------------------------------------------------------


@pytest.mark.parametrize("hostile", [
    pytest.param(answer(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"s" * 10_000, piece=1, pause=0.2), id="trickled"),
    pytest.param(answer(b""), id="silent"),
])
async def test_a_head_not_complete_within_the_idle_timeout_is_504(raw_upstream, tmp_path, hostile):
    """The idle timer re-arms on every byte; the head is due within the idle timeout once the
    request is sent, however it trickles."""
    upstream = await raw_upstream(hostile)
    async with running_gateway(tmp_path, routes_to(upstream), settings=Settings(idle_timeout=1.5)) as gw:
        started = monotonic()
        response = await get(gw, "/", 30)
        took = monotonic() - started
        assert response.status == 504, response
        assert response.json()["error"] == "upstream_timeout"
        assert 1.0 < took < 12, took
        await assert_upstream_closed(upstream)
        assert (await get(gw, "/healthy")).status == 200


async def test_each_interim_head_gets_its_own_head_timeout(raw_upstream, tmp_path):
    """1xx heads, each within the idle timeout but together far longer, then the response: 200."""
    continues = b"HTTP/1.1 100 Continue\r\n\r\n"
    upstream = await raw_upstream(answer(continues * 6 + OK, piece=len(continues), pause=0.6))
    async with running_gateway(tmp_path, routes_to(upstream), settings=Settings(idle_timeout=1.5)) as gw:
        response = await get(gw, "/", 30)
    assert (response.status, response.body) == (200, b"ok")


async def test_a_slow_upload_does_not_run_the_head_timer(aiohttp_server, tmp_path):
    """The head is due only once the request is sent: an upload longer than the idle timeout,
    answered after it ends, is served."""
    from tests.support.echo import make_echo_app

    echo = await aiohttp_server(make_echo_app("echo"), host="127.0.0.1")
    routes = GATEWAY + backend("echo", echo.port) + route_to("echo")
    async with running_gateway(tmp_path, routes, settings=Settings(idle_timeout=1.0)) as gw:

        async def slowly():
            for _ in range(6):
                yield b"x" * 100
                await asyncio.sleep(0.4)

        async with aiohttp.ClientSession() as session:
            async with session.post(url(gw, "/slow-upload"), data=slowly()) as response:
                assert response.status == 200
                assert (await response.json())["body_length"] == 600


# --- chunked response bodies -----------------------------------------------------------------


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"


@pytest.mark.parametrize("framing", [
    pytest.param(b"0" * (2 * MiB) + b"1\r\nx\r\n0\r\n\r\n", id="megabytes of leading zeros"),
    pytest.param(b"f" * (1 * MiB), id="megabytes of hex digits"),
    pytest.param(b"1;" + b"e" * (2 * MiB) + b"\r\nx\r\n0\r\n\r\n", id="an endless chunk extension"),
    pytest.param(b"1;e=\"" + b"v" * (2 * MiB) + b"\"\r\nx\r\n0\r\n\r\n", id="an endless quoted extension value"),
    pytest.param(b"0\r\n" + (b"X-T: " + b"t" * 8000 + b"\r\n") * 200 + b"\r\n", id="trailers past the head limit"),
    pytest.param(b"0\r\n" + b"".join(b"T%d: 1\r\n" % i for i in range(1000)) + b"\r\n", id="1000 tiny trailers"),
    pytest.param(b"0\r\nX-T: " + b"t" * (40 * 1024) + b"\r\n\r\n", id="one trailer line over 16 KiB"),
    pytest.param(b"zz\r\n" + b"x" * 100, id="a malformed chunk size, refused by the parser"),
])
async def test_over_long_chunked_framing_cuts_the_response(raw_upstream, tmp_path, framing):
    """Headers are already out: the client's connection is closed without the last chunk (long
    before the idle timeout), no framing reaches it, and the upstream connection is dropped."""
    upstream = await raw_upstream(answer(CHUNKED + framing, piece=16 * 1024))
    async with running_gateway(tmp_path, routes_to(upstream)) as gw:
        async with raw_connection(gw, 30) as (reader, writer):
            host, port = address(gw)
            writer.write(request("GET / HTTP/1.1", f"Host: {host}:{port}"))
            head = await read_response(reader, head=True)
            assert head.status == 200
            rest = bytearray()
            try:
                while chunk := await asyncio.wait_for(reader.read(65536), 20):
                    rest += chunk
            except ConnectionResetError:
                pass
        assert not rest.endswith(b"0\r\n\r\n"), "the cut response was completed"
        assert len(rest) < 64 * 1024, "framing bytes reached the client"
        await assert_upstream_closed(upstream)
        assert (await get(gw, "/healthy")).status == 200


async def test_valid_chunked_framing_within_the_limits_passes_whole(raw_upstream, tmp_path):
    """Many tiny chunks, chunk extensions and trailers near the limits all pass, however the
    upstream splits them."""
    chunks = b"".join(b"1;n=v\r\n%c\r\n" % (97 + i % 26) for i in range(5000))
    ext = b"3;" + b"e" * (15 * 1024) + b"\r\nabc\r\n"
    trailers = b"".join(b"X-T%d: " % i + b"t" * 200 + b"\r\n" for i in range(200))
    body = CHUNKED + chunks + ext + b"0\r\n" + trailers + b"\r\n"
    expected = b"hello" + bytes(97 + i % 26 for i in range(5000)) + b"abc"
    for piece in (0, 1000, 3):
        upstream = await raw_upstream(answer(body, piece=piece))
        directory = tmp_path / str(piece)
        directory.mkdir()
        async with running_gateway(directory, routes_to(upstream)) as gw:
            async with aiohttp.ClientSession() as session:
                async with session.get(url(gw, "/")) as response:
                    assert response.status == 200
                    assert await response.read() == expected


@pytest.mark.parametrize("data, limits, outcome", [
    (b"5\r\nhello\r\n0\r\n\r\n", ResponseLimits(), 15),
    (b"5\r\nhello\r\n0\r\n\r\nHTTP/1.1", ResponseLimits(), 15),  # what follows is not body
    (b"5;a=b\nhello\n0\nT: 1\n\n", ResponseLimits(), 20),
    (b"0" * 99 + b"5\r\nhello\r\n", ResponseLimits(line_bytes=100), ResponseRefused),  # CR counts
    (b"0" * 98 + b"5\r\nhello\r\n", ResponseLimits(line_bytes=100), None),
    (b"0\r\n" + b"T: 1\r\n" * 4 + b"\r\n", ResponseLimits(headers=3), ResponseRefused),
    (b"0\r\n" + b"T: 1\r\n" * 3 + b"\r\n", ResponseLimits(headers=3), 3 + 18 + 2),
    (b"0\r\n" + b"T: 12345\r\n" * 3 + b"\r\n", ResponseLimits(head_bytes=29), ResponseRefused),
    (b"0\r\n" + b"T: 12345\r\n" * 3 + b"\r\n", ResponseLimits(head_bytes=30), 3 + 30 + 2),
    (b"10\r\n" + b"\n" * 16 + b"\r\n", ResponseLimits(line_bytes=4), None),  # data is not a line
])
def test_chunked_framing_table(data, limits, outcome):
    """ChunkedFraming alone: where the body ends, or a violation; fed at once and byte by byte."""
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        framing, fed, result = ChunkedFraming(limits), 0, None
        try:
            for piece in pieces:
                end = framing.feed(piece)
                if end is not None:
                    result = fed + end
                    break
                fed += len(piece)
        except ResponseRefused:
            result = ResponseRefused
        assert result == outcome, (pieces[:1], result)


# --- the upstream's answer to a WebSocket upgrade ----------------------------------------------


def switching(extra: bytes):
    """A script that accepts a WebSocket upgrade with `extra` header lines in its 101."""

    async def script(head, reader, writer):
        key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", head).group(1)
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extra + b"\r\n")

    return script


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.mark.parametrize("extra, status", [
    pytest.param(b"".join(b"X-%d: 1\r\n" % i for i in range(200)), 101, id="200 headers (aiohttp's default allows 128)"),
    pytest.param(b"X-Long: " + b"l" * (15 * 1024) + b"\r\n", 101, id="a line under 16 KiB"),
    pytest.param(b"".join(b"X-%d: 1\r\n" % i for i in range(300)), 502, id="300 headers"),
    pytest.param(b"X-Long: " + b"l" * (20 * 1024) + b"\r\n", 502, id="a line over 16 KiB"),
])
async def test_the_upgrade_answer_is_held_to_the_same_line_and_count_limits(raw_upstream, tmp_path, extra, status):
    upstream = await raw_upstream(switching(extra))
    async with running_gateway(tmp_path, routes_to(upstream)) as gw:
        async with aiohttp.ClientSession() as session:
            if status == 101:
                async with session.ws_connect(url(gw, "/ws")) as ws:
                    assert not ws.closed
                return
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url(gw, "/ws"))
            assert refused.value.status == status
            upgrade = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
            host, port = address(gw)
            async with raw_connection(gw, 15) as (reader, writer):
                writer.write(request("GET /ws HTTP/1.1", f"Host: {host}:{port}", *upgrade))
                assert_upstream_invalid(await read_response(reader))
        assert (await get(gw, "/healthy")).status == 200
