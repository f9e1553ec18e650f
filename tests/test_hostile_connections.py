"""Hostile connections, on raw sockets to a running gateway (SPEC §3.1 "Limits hold while reading"):
huge or slow request heads, parse errors followed by a flood, idle connections, an upstream that
switches protocols unasked, and responses finished while draining.

Memory is the gateway process's peak resident set (this process: the gateway runs in it), reset
before each attack through /proc/self/clear_refs.
"""

from __future__ import annotations

import asyncio
import gzip
import re

import aiohttp
import pytest

from gateway.config.loader import load_routes_from_string
from gateway.policy.loader import load_policies
from gateway.server.handler import Settings
from tests.support.echo import make_echo_app
from tests.support.gated import start_gated
from tests.support.harness import GATEWAY, backend, route_to, running_gateway, url
from tests.support.rawhttp import closed_within, raw_connection, read_response, request
from tests.support.rawupstream import answer, raw_upstream  # noqa: F401 - a fixture
from tests.test_policy_traffic import client_policy

MiB = 1024 * 1024


@pytest.fixture
async def app(aiohttp_server):
    """Routes to an echo upstream whose own header limits are wider than the gateway's, so that
    what the gateway lets through is answered by the upstream."""
    wide = {"max_line_size": 256 * 1024, "max_field_size": 256 * 1024, "max_headers": 1024}
    server = await aiohttp_server(make_echo_app("app"), host="127.0.0.1", **wide)
    return GATEWAY + backend("app", server.port) + route_to("app")


def address(gw) -> tuple[str, int]:
    return next(iter(gw.addresses.values()))


def peak_rss_since_reset() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1)) * 1024


def reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return peak_rss_since_reset()


async def answer_then_close(reader: asyncio.StreamReader, writing: asyncio.Task):
    """The gateway's one answer, and whether it then closed; `writing` (the flood) is stopped."""
    try:
        response = await asyncio.wait_for(read_response(reader), 20)
        closed = await closed_within(reader, 10)
    finally:
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
    return response, closed


async def flood(writer: asyncio.StreamWriter, head: bytes, chunk: bytes, total: int, pause: float = 0.0) -> None:
    """`head`, then `chunk` again and again up to `total` bytes, as fast as the gateway reads
    (or with `pause` between chunks); stops quietly when the gateway closes."""
    try:
        writer.write(head)
        sent = len(head)
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            if pause:
                await asyncio.sleep(pause)
    except (ConnectionError, OSError):
        pass


async def flood_from_many(host: str, port: int, head: bytes, chunk: bytes, total: int, *, clients: int = 20,
                          pause: float = 0.0) -> list:
    """`clients` connections each flooding (flood()); each one's (answer, closed)."""

    async def attack():
        reader, writer = await asyncio.open_connection(host, port)
        writing = asyncio.ensure_future(flood(writer, head, chunk, total, pause=pause))
        try:
            return await answer_then_close(reader, writing)
        finally:
            writer.close()

    return await asyncio.gather(*(attack() for _ in range(clients)))


def assert_refused(response, status: int, code: str) -> None:
    assert response.status == status, (response.status, response.body[:200])
    body = response.json()
    assert body["error"] == code and body["message"] and body["request_id"], body
    assert response.header("Connection") == "close" or response.version == "HTTP/1.0"  # 1.0: close implied


# --- the header limit, while reading ---------------------------------------------------------


@pytest.mark.parametrize("settings, policy, limit", [
    (Settings(), None, 64 * 1024),
    (Settings(max_header_bytes=40 * 1024), None, 40 * 1024),
    (Settings(), "  headers: {maxRequestHeaderLimit: 24Ki}\n", 24 * 1024),
])
async def test_huge_header_sections_sent_slowly_by_many_clients_are_431_with_memory_bounded(
        app, tmp_path, settings, policy, limit):
    """20 connections each trickle header lines (each under the line limit) towards 4 MiB: each
    is answered 431 (JSON, Connection: close) and closed once over the limit, and the gateway's
    memory grows by far less than what was sent (about 20 × the limit)."""
    policies = client_policy(policy) if policy else None
    line = b"X-Filler: " + b"f" * 8000 + b"\r\n"
    async with running_gateway(tmp_path, app, settings=settings, policies_yaml=policies) as gw:
        host, port = address(gw)
        head = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
        before = reset_peak_rss()

        results = await flood_from_many(host, port, head, line, 4 * MiB, pause=0.002)
        grown = peak_rss_since_reset() - before
        for response, closed in results:
            assert_refused(response, 431, "headers_too_large")
            assert closed, "the connection stayed open after the 431"
        # Without the limit while reading, each connection makes the gateway hold its 2 MiB of
        # headers (256 lines of 8 KB) several times over (about 80 MiB in all); with it, about
        # `limit` each, counted generously.
        bound = 20 * limit * 8 + 8 * MiB
        assert grown < bound, f"the gateway grew by {grown / MiB:.1f} MiB for 20 refused heads"
        async with raw_connection(gw) as (reader, writer):  # still serving the next client
            writer.write(head + b"\r\n")
            assert (await read_response(reader)).status == 200


async def test_a_head_just_under_the_limit_passes_and_one_byte_over_is_431(app, tmp_path):
    """The count is exact for the request line plus headers: at the limit 200, one byte more 431;
    however the bytes are split into chunks."""
    limit = 30 * 1024
    async with running_gateway(tmp_path, app, settings=Settings(max_header_bytes=limit)) as gw:
        host, port = address(gw)

        def head_of(size: int) -> bytes:
            start = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
            lines, filler = [], size - len(start) - 2
            while filler > 0:
                part = min(filler, 10_000)
                # the last line may be short: pad it to a valid "X-Pn: v\r\n" of `part` bytes
                name = f"X-P{len(lines)}: ".encode()
                lines.append(name + b"v" * (part - len(name) - 2) + b"\r\n")
                filler -= part
            return start + b"".join(lines) + b"\r\n"

        for size, status in ((limit, 200), (limit + 1, 431)):
            raw = head_of(size)
            assert len(raw) == size
            for chunk in (len(raw), 1000, 7):  # at once, and in pieces
                async with raw_connection(gw, 15) as (reader, writer):
                    for i in range(0, len(raw), chunk):
                        writer.write(raw[i:i + chunk])
                    await writer.drain()
                    response = await read_response(reader)
                assert response.status == status, (size, chunk, response.status)


async def test_one_header_line_over_16_KiB_is_431_and_one_under_passes(app, tmp_path):
    async with running_gateway(tmp_path, app) as gw:
        host, port = address(gw)
        for size, status in ((15_000, 200), (17_000, 431)):
            async with raw_connection(gw) as (reader, writer):
                writer.write(request("GET / HTTP/1.1", f"Host: {host}:{port}", "X-Long: " + "l" * size))
                response = await read_response(reader)
            assert response.status == status, size
            if status == 431:
                assert response.json()["error"] == "headers_too_large"


async def test_bodies_and_pipelined_requests_are_not_counted_as_headers(app, tmp_path):
    """A body sent in the same chunk as its head, a body much larger than the header limit, and
    requests pipelined after it are all served: only heads are counted."""
    async with running_gateway(tmp_path, app, settings=Settings(max_header_bytes=8 * 1024)) as gw:
        host, port = address(gw)
        body = b"b" * (3 * MiB)
        post = request("POST / HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}", body=body)
        get = request("GET /next HTTP/1.1", f"Host: {host}:{port}")
        async with raw_connection(gw, 20) as (reader, writer):
            writer.write(post + get + get + post + get)
            await writer.drain()
            responses = [await read_response(reader) for _ in range(5)]
        assert [r.status for r in responses] == [200] * 5
        assert responses[0].json()["body_length"] == len(body)


async def test_many_pipelined_requests_in_one_write_are_served_under_a_tiny_header_limit(app, tmp_path):
    """Hundreds of small heads in one chunk, each under a 200-byte limit, past aiohttp's queue of
    parsed requests: every one is answered, none is taken for an over-long head."""
    async with running_gateway(tmp_path, app, settings=Settings(max_header_bytes=200)) as gw:
        host, port = address(gw)
        one = request("GET /p HTTP/1.1", f"Host: {host}:{port}")
        assert len(one) < 200
        async with raw_connection(gw, 60) as (reader, writer):
            writer.write(one * 300)
            await writer.drain()
            statuses = [(await read_response(reader)).status for _ in range(300)]
        assert statuses == [200] * 300


@pytest.mark.parametrize("before", ["body", "head"])
@pytest.mark.parametrize("kib", [20, 70, 180])
async def test_a_head_read_together_with_the_end_of_the_previous_request_is_counted(app, tmp_path, before, kib):
    """The next head arrives in the same read as the end of a body (or of a body-less request):
    it is held to the same limit (16 KiB here) and refused with a 431, never served."""
    async with running_gateway(tmp_path, app, settings=Settings(max_header_bytes=16 * 1024)) as gw:
        host, port = address(gw)
        filler = [f"X-F{i}: {'f' * 900}" for i in range(kib)]
        big = request("GET /big HTTP/1.1", f"Host: {host}:{port}", *filler)
        async with raw_connection(gw, 20) as (reader, writer):
            if before == "body":
                writer.write(request("POST / HTTP/1.1", f"Host: {host}:{port}", "Content-Length: 1"))
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"a" + big)  # the body's last byte and the whole next head: one read
            else:
                writer.write(request("GET /first HTTP/1.1", f"Host: {host}:{port}") + big)
            await writer.drain()
            first = await read_response(reader)
            second = await read_response(reader)
        assert first.status == 200
        assert_refused(second, 431, "headers_too_large")


@pytest.mark.parametrize("before", ["body", "head"])
async def test_a_head_begun_in_the_same_read_as_the_previous_request_is_due_within_the_header_timeout(
        app, tmp_path, before):
    """The start of the next head arrives with the end of the previous request, then nothing:
    the header timeout (1 s), not the idle timeout (20 s), closes the connection."""
    settings = Settings(request_headers_timeout=1.0, client_idle_timeout=20.0)
    async with running_gateway(tmp_path, app, settings=settings) as gw:
        host, port = address(gw)
        partial = f"GET /stalled HTTP/1.1\r\nHost: {host}:{port}\r\nX-Half: ".encode()
        async with raw_connection(gw, 20) as (reader, writer):
            if before == "body":
                writer.write(request("POST / HTTP/1.1", f"Host: {host}:{port}", "Content-Length: 1"))
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"a" + partial)
            else:
                writer.write(request("GET /first HTTP/1.1", f"Host: {host}:{port}") + partial)
            await writer.drain()
            started = asyncio.get_running_loop().time()
            assert (await read_response(reader)).status == 200
            assert await closed_within(reader, 8), "a stalled head after a request was never cut"
        assert asyncio.get_running_loop().time() - started < 8


async def test_a_compressed_request_body_reaches_the_upstream_as_sent(tmp_path, raw_upstream):
    """Content-Encoding passes untouched (SPEC §3.1): the gateway neither inflates a gzip body
    (it would forward it under its gzip header) nor spends anything on a compression bomb."""
    received = []

    async def keep_body(head, reader, writer):
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        received.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await raw_upstream(keep_body)
    routes = GATEWAY + backend("up", server.sockets[0].getsockname()[1]) + route_to("up")
    bomb = gzip.compress(b"\0" * (64 * MiB))  # 64 KiB that would inflate to 64 MiB
    async with running_gateway(tmp_path, routes) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.post(url(gw, "/upload"), data=bomb, headers={"Content-Encoding": "gzip"}) as response:
                assert response.status == 200
    assert received == [bomb]


# --- header and idle timeouts ----------------------------------------------------------------


@pytest.mark.parametrize("settings, policy", [
    (Settings(request_headers_timeout=1.0), None),
    (Settings(), "  timeout:\n    http: {requestHeadersReceivedTimeout: 800ms}\n"),
])
async def test_a_slowloris_trickling_its_head_is_cut_at_the_header_timeout(app, tmp_path, settings, policy):
    """One header byte every 200 ms (never idle, never over the size limit) is disconnected at
    the header timeout, from the request's first byte."""
    policies = client_policy(policy) if policy else None
    async with running_gateway(tmp_path, app, settings=settings, policies_yaml=policies) as gw:
        host, port = address(gw)
        reader, writer = await asyncio.open_connection(host, port)
        trickle = asyncio.ensure_future(flood(writer, f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: ".encode(),
                                              b"s", 10_000, pause=0.2))
        started = asyncio.get_running_loop().time()
        try:
            assert await closed_within(reader, 10), "a slow head was never cut"
        finally:
            trickle.cancel()
            writer.close()
        assert asyncio.get_running_loop().time() - started >= 0.5  # cut by the timer, not at once


async def test_a_slow_head_within_the_header_timeout_is_served_even_past_the_idle_timeout(app, tmp_path):
    """The idle timer covers the time before a request's first byte; once a head is arriving,
    only the header timeout applies."""
    settings = Settings(client_idle_timeout=2.0, request_headers_timeout=20.0)
    async with running_gateway(tmp_path, app, settings=settings) as gw:
        host, port = address(gw)
        raw = request("GET / HTTP/1.1", f"Host: {host}:{port}", "X-Slow: yes")
        async with raw_connection(gw, 20) as (reader, writer):
            await asyncio.sleep(0.5)
            for i in range(0, len(raw), len(raw) // 6 + 1):  # 7 pieces over 3.5 s
                writer.write(raw[i:i + len(raw) // 6 + 1])
                await asyncio.sleep(0.5)
            assert (await read_response(reader)).status == 200


@pytest.mark.parametrize("settings, policy", [
    (Settings(client_idle_timeout=1.0), None),
    (Settings(), "  timeout:\n    http: {idleTimeout: 700ms}\n"),
])
async def test_idle_connections_are_closed_at_the_idle_timeout(app, tmp_path, settings, policy):
    """A kept-alive connection after its response, and one that never sent a byte."""
    policies = client_policy(policy) if policy else None
    async with running_gateway(tmp_path, app, settings=settings, policies_yaml=policies) as gw:
        host, port = address(gw)
        silent = await asyncio.open_connection(host, port)
        async with raw_connection(gw, 20) as (reader, writer):
            writer.write(request("GET / HTTP/1.1", f"Host: {host}:{port}"))
            response = await read_response(reader)
            assert response.status == 200 and response.header("Connection") != "close"
            assert await closed_within(reader, 10), "an idle kept-alive connection stayed open"
        assert await closed_within(silent[0], 10), "a connection that never sent a byte stayed open"
        silent[1].close()


async def test_the_default_timeouts_leave_a_normal_keep_alive_connection_open(app, tmp_path):
    async with running_gateway(tmp_path, app) as gw:
        host, port = address(gw)
        async with raw_connection(gw, 20) as (reader, writer):
            for _ in range(2):
                writer.write(request("GET / HTTP/1.1", f"Host: {host}:{port}"))
                assert (await read_response(reader)).status == 200
                assert not await closed_within(reader, 1.5)


@pytest.mark.parametrize("http, error", [
    ("{requestHeadersReceivedTimeout: 0s}", "requestHeadersReceivedTimeout must be greater than 0s"),
    ("{idleTimeout: 0s}", "idleTimeout must be greater than 0s"),
    ("{idleTimeout: soon}", "does not match"),  # the CRD schema's pattern
])
def test_client_policy_timeouts_that_would_disable_the_guard_are_refused(tmp_path, http, error):
    config = load_routes_from_string(GATEWAY + backend("app", 1) + route_to("app"))
    (tmp_path / "client.yaml").write_text(client_policy(f"  timeout:\n    http: {http}\n"))
    errors = load_policies(str(tmp_path), config).errors
    assert len(errors) == 1 and error in errors[0] and errors[0].startswith(f"{tmp_path / 'client.yaml'}:"), errors


def test_the_lowest_timeouts_of_the_gateways_on_a_port_apply(tmp_path):
    """Two Gateways on one port: each timeout at the lowest either sets, the header limit at the
    highest either allows (the Gateway is known only once the head is read)."""
    from gateway.policy.runtime import PolicyRuntime
    from gateway.routing.table import compile_table
    from gateway.server.handler import Gateway
    from gateway.server.metrics import Metrics

    routes = GATEWAY + "---\n" + GATEWAY.replace("name: gw,", "name: gw2,") + backend("app", 1) + route_to("app")
    config = load_routes_from_string(routes)
    assert not config.errors, config.errors
    (tmp_path / "a.yaml").write_text(client_policy(
        "  headers: {maxRequestHeaderLimit: 8Ki}\n  timeout:\n    http: {idleTimeout: 9s, requestHeadersReceivedTimeout: 4s}\n"))
    (tmp_path / "b.yaml").write_text(client_policy("  timeout:\n    http: {idleTimeout: 5s}\n")
                                     .replace("name: edge", "name: edge2").replace("name: gw}", "name: gw2}"))
    policies = load_policies(str(tmp_path), config)
    assert not policies.errors, policies.errors
    settings = Settings(max_header_bytes=50_000, request_headers_timeout=30, client_idle_timeout=60)
    gateway = Gateway(compile_table(config), PolicyRuntime(policies, config, None), settings, Metrics(), None, None)
    limits = gateway.listener_limits(80)
    assert (limits.header_bytes, limits.headers_timeout, limits.idle_timeout) == (50_000, 4.0, 5.0)
    assert gateway.listener_limits(8080).idle_timeout == 60  # a port no Gateway declares


# --- nothing is read after a parse error -----------------------------------------------------


@pytest.mark.parametrize("malformed, status, code", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nBroken header line\r\n\r\n", 400, "bad_request"),
    (b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"l" * 20_000 + b"\r\n\r\n", 431, "headers_too_large"),
])
async def test_a_malformed_request_followed_by_a_flood_is_answered_and_closed_with_memory_bounded(
        app, tmp_path, malformed, status, code):
    """After the first parse error the gateway parses and keeps nothing more of the connection:
    its answer arrives, the connection closes, and 20 clients each streaming 8 MiB of garbage
    after their bad request do not make the gateway hold what they send."""
    async with running_gateway(tmp_path, app) as gw:
        host, port = address(gw)
        garbage = b"\xffgarbage\r\n" * 6554  # 64 KiB chunks, no line end the parser would like
        before = reset_peak_rss()

        results = await flood_from_many(host, port, malformed, garbage, 8 * MiB)
        grown = peak_rss_since_reset() - before
        for response, closed in results:
            assert_refused(response, status, code)
            assert closed, "the connection stayed open after the error"
        assert grown < 24 * MiB, f"the gateway grew by {grown / MiB:.1f} MiB"


# --- an upstream that switches protocols unasked ---------------------------------------------


@pytest.fixture
async def scripted_upstream(raw_upstream):
    """Factory: an upstream that answers every request with the given bytes, then waits; its
    `closed` records, per connection, whether the gateway closed it (tests/support/rawupstream.py)."""
    return lambda raw: raw_upstream(answer(raw))


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tunnel\r\nConnection: Upgrade\r\n\r\nTUNNEL-BYTES-FROM-UPSTREAM"


@pytest.mark.parametrize("extra", [(), ("Connection: Upgrade", "Upgrade: tunnel"), ("Connection: Upgrade", "Upgrade: h2c")])
async def test_an_upstream_101_on_a_plain_request_is_502_and_nothing_is_relayed(scripted_upstream, tmp_path, extra):
    """A 101 to a request that is not a WebSocket upgrade (whatever `Upgrade` the client sent:
    it is hop-by-hop and never forwarded) would open a tunnel past the gateway: 502 bad_gateway,
    the upstream connection is closed, no byte after the 101 reaches the client."""
    upstream = await scripted_upstream(SWITCH)
    port = upstream.sockets[0].getsockname()[1]
    async with running_gateway(tmp_path, GATEWAY + backend("up", port) + route_to("up")) as gw:
        host, gw_port = address(gw)
        async with raw_connection(gw, 15) as (reader, writer):
            writer.write(request("GET /plain HTTP/1.1", f"Host: {host}:{gw_port}", *extra))
            response = await read_response(reader)
            assert response.status == 502, response
            assert response.json()["error"] == "bad_gateway"
            writer.write(request("GET /again HTTP/1.1", f"Host: {host}:{gw_port}", "Connection: close"))
            rest = await asyncio.wait_for(reader.read(), 10)
        assert b"TUNNEL-BYTES" not in response.body + rest
        assert rest.startswith(b"HTTP/1.1 502"), rest[:40]  # the client connection still speaks HTTP
        for _ in range(50):
            if len(upstream.closed) == 2:
                break
            await asyncio.sleep(0.1)
        assert upstream.closed == [True, True], "an upstream connection was kept after its 101"


@pytest.mark.parametrize("interim, status", [(3, 200), (17, 502), (5000, 502)])
async def test_interim_responses_are_skipped_but_not_forever(scripted_upstream, tmp_path, interim, status):
    """An upstream's 1xx responses before the real one are skipped; one that sends 1xx without
    end gets a 502 (upstream_invalid) instead of holding the request."""
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * interim
    upstream = await scripted_upstream(early_hints + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    port = upstream.sockets[0].getsockname()[1]
    async with running_gateway(tmp_path, GATEWAY + backend("up", port) + route_to("up")) as gw:
        host, gw_port = address(gw)
        async with raw_connection(gw, 15) as (reader, writer):
            writer.write(request("GET / HTTP/1.1", f"Host: {host}:{gw_port}"))
            response = await read_response(reader)
        assert response.status == status, response
        if status == 502:
            assert response.json()["error"] == "upstream_invalid"
        else:
            assert response.body == b"ok"


# --- draining --------------------------------------------------------------------------------


async def test_a_response_finished_during_a_drain_says_connection_close(aiohttp_server, tmp_path):
    """A request in flight when the drain begins is answered, with `Connection: close`, and the
    connection is then closed."""
    gated, port = await start_gated(aiohttp_server)
    async with running_gateway(tmp_path, GATEWAY + backend("gated", port) + route_to("gated"), drain_seconds=10) as gw:
        host, gw_port = address(gw)
        async with raw_connection(gw, 15) as (reader, writer):
            writer.write(request("GET /before HTTP/1.1", f"Host: {host}:{gw_port}"))
            before = await read_response(reader)
            assert before.status == 200 and before.header("Connection") is None  # kept alive
            writer.write(request("GET /gate HTTP/1.1", f"Host: {host}:{gw_port}"))
            await asyncio.wait_for(gated.arrived.wait(), 10)
            draining = asyncio.ensure_future(gw.drain())
            await asyncio.sleep(0.3)  # the drain is under way, the request still held
            assert not draining.done()
            gated.release.set()
            during = await read_response(reader)
            assert during.status == 200 and during.json()["path"] == "/gate"
            assert during.header("Connection") == "close"
            assert await closed_within(reader, 10)
            await asyncio.wait_for(draining, 15)


# --- the process-wide default connection limit -----------------------------------------------


@pytest.mark.parametrize("policy, allowed", [(None, 2), ("  connection:\n    connectionLimit: {value: 3}\n", 3)])
async def test_the_default_connection_limit_holds_unless_a_client_policy_sets_one(app, tmp_path, policy, allowed):
    """`--connection-limit` (Settings.connection_limit): connections over it are closed unanswered;
    a ClientTrafficPolicy connectionLimit.value replaces it."""
    policies = client_policy(policy) if policy else None
    async with running_gateway(tmp_path, app, settings=Settings(connection_limit=2), policies_yaml=policies) as gw:
        host, port = address(gw)
        held = []
        try:
            for _ in range(allowed):
                held.append(await asyncio.open_connection(host, port))
                held[-1][1].write(request("GET / HTTP/1.1", f"Host: {host}:{port}"))
                assert (await asyncio.wait_for(read_response(held[-1][0]), 10)).status == 200
            reader, writer = await asyncio.open_connection(host, port)
            held.append((reader, writer))
            writer.write(request("GET / HTTP/1.1", f"Host: {host}:{port}"))
            try:
                answer = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                answer = b""
            assert answer == b"", f"a connection over the limit was answered: {answer[:40]!r}"
        finally:
            for _, w in held:
                w.close()
