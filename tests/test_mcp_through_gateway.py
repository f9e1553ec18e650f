"""A real MCP client through Sandgate to a real MCP SDK server (SPEC §3.1, §3.4).

Client: the official `mcp` SDK (`Client` over `streamable_http_client`), its httpx2 client on a
recording transport. Upstream: the dev stack's MCP server plus a few test tools
(tests/support/mcp_upstream.py) under uvicorn, wrapped in a recording ASGI middleware. Route:
HTTPRoute `PathPrefix /mcp` → Envoy Gateway Backend 127.0.0.1:<port>; no policy.

Both sides record every exchange (headers, each body chunk with its time on one shared clock),
so the tests compare what the client sent with what the server received and back, and when each
SSE event left the server with when it reached the client.

Timing: everything is fast except `test_slow_...` (~16 s, deliberately: a silent upstream past
15 s); deselect it with `-k "not slow"`.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from contextlib import asynccontextmanager
from time import monotonic

import httpx2
import mcp.server._streamable_http_modern as modern_http
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from sse_starlette import EventSourceResponse

from tests.support.fixtures import recording_mcp  # noqa: F401 (fixture)
from tests.support.harness import mcp_routes, running_gateway, url
from tests.support.mcp_upstream import Exchange, RecordingTransport

MODES = ["legacy", "auto"]  # the session (initialize handshake) era and the 2026 stateless era

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
ADDED_BY_GATEWAY = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
# Added by the upstream's HTTP server (uvicorn) below the ASGI app, so absent from its record.
ADDED_BY_UVICORN = {"date", "server"}

# The largest lag between a byte leaving the upstream and reaching the client that still counts
# as "relayed at once" on loopback (a buffering proxy holds events for the whole call: seconds).
LIVE = 0.5


@pytest.fixture
async def gw(tmp_path, upstream):
    async with running_gateway(tmp_path, mcp_routes(upstream.port)) as running:
        yield running


@asynccontextmanager
async def connect(running, mode: str, **client_options):
    """An SDK client on the gateway's /mcp; yields (client, wire) where wire records every exchange."""
    wire = RecordingTransport()
    async with httpx2.AsyncClient(transport=wire, timeout=httpx2.Timeout(30, read=300)) as http:
        transport = streamable_http_client(url(running, "/mcp"), http_client=http)
        async with Client(transport, mode=mode, **client_options) as client:
            yield client, wire


async def eventually(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def _comparable(headers: list[tuple[str, str]], drop: set[str]) -> list[tuple[str, str]]:
    # Names compare case-insensitively; values exactly; a repeated name keeps its values' order.
    return sorted(((n.lower(), v) for n, v in headers if n.lower() not in drop), key=lambda h: h[0])


def assert_passed_unchanged(client_side: Exchange, server_side: Exchange) -> None:
    """SPEC §3.1: every end-to-end header passes unchanged both ways; the gateway only drops
    hop-by-hop headers, adds X-Forwarded-* and X-Request-Id, and never duplicates a header."""
    assert _comparable(server_side.request_headers, HOP_BY_HOP | ADDED_BY_GATEWAY) == _comparable(
        client_side.request_headers, HOP_BY_HOP
    ), f"{client_side.method} request headers changed on the way up"
    assert _comparable(client_side.response_headers, HOP_BY_HOP | ADDED_BY_UVICORN | {"x-request-id"}) == _comparable(
        server_side.response_headers, HOP_BY_HOP
    ), f"{client_side.method} response ({client_side.status}) headers changed on the way down"
    assert client_side.status == server_side.status
    assert len(client_side.response_header("date")) == 1
    assert len(client_side.response_header("server")) <= 1
    request_id = server_side.request_header("x-request-id")
    assert len(request_id) == 1 and client_side.response_header("x-request-id") == request_id


def sent_events(exchange: Exchange, marker: bytes) -> list[tuple[float, bytes]]:
    return [(t, chunk) for t, chunk in exchange.chunks if marker in chunk]


_PROGRESS = re.compile(rb'"progress"\s*:\s*([0-9.]+)')


# --- 1. session era ---------------------------------------------------------------------------


async def test_session_era_initialize_session_id_tools_get_stream_and_delete(gw, upstream):
    async with connect(gw, "legacy") as (client, wire):
        version = client.protocol_version
        assert version in HANDSHAKE_PROTOCOL_VERSIONS
        assert client.server_info.name == "sandgate-dev-mcp"

        initialize = wire.exchanges[0]
        assert (initialize.method, initialize.status) == ("POST", 200)
        assert initialize.request_header("mcp-session-id") == []
        session_ids = initialize.response_header("mcp-session-id")
        assert len(session_ids) == 1, initialize.response_headers
        session_id = session_ids[0]
        assert upstream.paired(initialize).response_header("mcp-session-id") == [session_id]

        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert {"echo", "add", "slow_count", "request_headers"} <= tools
        echoed = await client.call_tool("echo", {"text": "héllo"})
        assert not echoed.is_error and echoed.content[0].text == "héllo"
        summed = await client.call_tool("add", {"a": 2, "b": 40})
        assert summed.structured_content == {"result": 42}
        seen = dict((await client.call_tool("request_headers", {})).structured_content["result"])
        assert seen["mcp-session-id"] == session_id
        assert seen["mcp-protocol-version"] == client.protocol_version
        assert seen["host"] == url(gw, "").split("//")[1].rstrip("/")  # Host kept (SPEC §3.1)

        # The standalone GET event stream: answered 200 text/event-stream and still open.
        get = await eventually(
            lambda: next((e for e in wire.exchanges if e.method == "GET" and e.status is not None), None),
            what="the GET event stream's response headers",
        )
        assert get.status == 200 and get.content_type == "text/event-stream"
        assert get.request_header("mcp-session-id") == [session_id]
        await asyncio.sleep(0.5)
        assert get.ended is None and get.closed is None
        server_get = upstream.paired(get)
        assert server_get.ended is None and server_get.closed is None

        for exchange in wire.exchanges[1:]:
            assert exchange.request_header("mcp-session-id") == [session_id], exchange.method
            assert exchange.request_header("mcp-protocol-version") == [client.protocol_version], exchange.method
        assert [e.method for e in wire.exchanges].count("GET") == 1  # never cut and reopened

    deletes = [e for e in wire.exchanges if e.method == "DELETE"]
    assert len(deletes) == 1
    assert deletes[0].status == 200
    assert deletes[0].request_header("mcp-session-id") == [session_id]
    assert upstream.paired(deletes[0]).status == 200

    for exchange in wire.exchanges:
        assert_passed_unchanged(exchange, upstream.paired(exchange))

    # DELETE ended the session: the server now answers 404 for it, through the gateway.
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            url(gw, "/mcp"),
            json={"jsonrpc": "2.0", "id": 99, "method": "tools/list", "params": {}},
            headers={
                "Accept": "application/json, text/event-stream",
                "Mcp-Session-Id": session_id,
                "MCP-Protocol-Version": version,
            },
        )
    assert response.status_code == 404


# --- 2. stateless era -------------------------------------------------------------------------


async def test_stateless_era_tools_and_routing_headers(gw, upstream):
    async with connect(gw, "auto") as (client, wire):
        assert client.protocol_version in MODERN_PROTOCOL_VERSIONS
        assert client.server_info.name == "sandgate-dev-mcp"
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert {"echo", "add", "regional_echo"} <= tools
        echoed = await client.call_tool("echo", {"text": "héllo"})
        assert not echoed.is_error and echoed.content[0].text == "héllo"
        summed = await client.call_tool("add", {"a": 2, "b": 40})
        assert summed.structured_content == {"result": 42}
        # Mcp-Param-Region mirrors a body argument; the server rejects any mismatch (HEADER_MISMATCH).
        # A non-token value travels base64-wrapped: it must arrive byte for byte.
        regional = await client.call_tool("regional_echo", {"region": "Zürich 1", "text": "hi"})
        assert not regional.is_error, regional.content
        assert regional.content[0].text == "Zürich 1:hi"
        seen = dict((await client.call_tool("request_headers", {})).structured_content["result"])
        assert seen["mcp-method"] == "tools/call"
        assert seen["mcp-name"] == "request_headers"
        assert seen["mcp-protocol-version"] == client.protocol_version
        assert "mcp-session-id" not in seen

    assert {e.method for e in wire.exchanges} == {"POST"}  # no session: no GET stream, no DELETE
    region_calls = [e for e in wire.exchanges if e.request_header("mcp-name") == ["regional_echo"]]
    assert len(region_calls) == 1
    sent = region_calls[0].request_header("mcp-param-region")
    assert len(sent) == 1
    assert upstream.paired(region_calls[0]).request_header("mcp-param-region") == sent
    for exchange in wire.exchanges:
        assert exchange.request_header("mcp-session-id") == []
        assert exchange.request_header("mcp-method"), "every 2026 request names its method"
        assert_passed_unchanged(exchange, upstream.paired(exchange))


# --- 3. progress, live ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_progress_notifications_stream_through_one_by_one(gw, upstream, mode):
    n, delay = 5, 0.5
    progress: list[tuple[float, float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((monotonic(), value, total, message))

    async with connect(gw, mode) as (client, wire):
        started = monotonic()
        result = await client.call_tool("slow_count", {"n": n, "delay": delay}, progress_callback=on_progress)
        done = monotonic()
    assert result.content[0].text == f"counted to {n}"
    assert [(value, total) for _, value, total, _ in progress] == [(k, n) for k in range(1, n + 1)]
    assert progress[0][3] == f"step 1 of {n}"
    arrivals = [t for t, *_ in progress]
    # The first arrives at once, long before the result (the tool runs (n-1)*delay = 2 s).
    assert arrivals[0] - started < 0.5, f"first progress after {arrivals[0] - started:.2f}s"
    assert done - arrivals[0] >= (n - 1) * delay - 0.3
    # One by one, spread by the tool's interval, not in a burst.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(delay / 2 <= gap <= delay + 1.0 for gap in gaps), [round(g, 3) for g in gaps]

    # Each event reached the client right after the upstream sent it.
    (call,) = [e for e in upstream.exchanges if b"counted to" in e.body]
    assert call.content_type == "text/event-stream"
    sent = {}
    for t, chunk in sent_events(call, b"notifications/progress"):
        sent[float(_PROGRESS.search(chunk).group(1))] = t
    assert sorted(sent) == [float(k) for k in range(1, n + 1)]
    lags = [arrival - sent[value] for arrival, value, _, _ in progress]
    assert max(lags) < LIVE, f"upstream→client lag per event: {[round(x, 3) for x in lags]}"


# --- 4. a call silent for longer than 15 s (SLOW: ~16 s) ---------------------------------------

QUIET = 16.0


async def test_slow_tool_call_silent_for_16s_is_not_cut_by_the_default_idle_timeout(gw, upstream, monkeypatch):
    """SLOW (~16 s). The SDK server pings an open SSE stream every 15 s; those pings are switched off
    here so the upstream sends no byte for 16 s, which the server-side record verifies. Both eras
    run at once: the session era after the SSE headers and one event (silent mid-stream), the
    stateless era before any response byte (silent before the headers)."""
    monkeypatch.setattr(EventSourceResponse, "DEFAULT_PING_INTERVAL", 3600)
    monkeypatch.setattr(modern_http, "_SSE_PING_INTERVAL", 3600.0)

    async def call(mode: str, heads_up: bool):
        async def on_progress(value, total, message):
            pass

        async with connect(gw, mode) as (client, wire):
            started = monotonic()
            result = await client.call_tool(
                "quiet", {"seconds": QUIET, "heads_up": heads_up}, progress_callback=on_progress
            )
            elapsed = monotonic() - started
            open_gets = [e for e in wire.exchanges if e.method == "GET" and e.ended is None and e.closed is None]
            all_gets = [e for e in wire.exchanges if e.method == "GET"]
        return result, elapsed, open_gets, all_gets

    (session, session_s, open_gets, all_gets), (stateless, stateless_s, _, _) = await asyncio.wait_for(
        asyncio.gather(call("legacy", True), call("auto", False)), QUIET + 30
    )
    assert not session.is_error, session.content
    assert session.content[0].text == f"quiet for {QUIET:g}s"
    assert not stateless.is_error, stateless.content
    assert stateless.content[0].text == f"quiet for {QUIET:g}s"
    assert session_s >= QUIET and stateless_s >= QUIET

    calls = [e for e in upstream.exchanges if f"quiet for {QUIET:g}s".encode() in e.body]
    assert len(calls) == 2
    (mid_stream,) = [e for e in calls if e.request_header("mcp-session-id")]
    (before_headers,) = [e for e in calls if not e.request_header("mcp-session-id")]
    # Really silent upstream: no byte for > 15 s after the headers + one event / before anything.
    times = [mid_stream.response_started] + [t for t, _ in mid_stream.chunks]
    assert max(b - a for a, b in zip(times, times[1:])) > 15.5
    assert before_headers.response_started - before_headers.started > 15.5

    # The session's GET event stream (silent all along too) outlived the quiet call, never reopened.
    assert len(all_gets) == 1 and len(open_gets) == 1


# --- 5. the GET event stream stays open and carries server notifications ------------------------

HOLD = 5.0


async def test_get_event_stream_stays_open_and_delivers_a_later_server_notification(gw, upstream):
    logs: list[tuple[float, object]] = []

    async def on_log(params) -> None:
        logs.append((monotonic(), params))

    async with connect(gw, "legacy", logging_callback=on_log) as (client, wire):
        get = await eventually(
            lambda: next((e for e in wire.exchanges if e.method == "GET" and e.status is not None), None),
            what="the GET event stream's response headers",
        )
        assert get.status == 200 and get.content_type == "text/event-stream"
        server_get = upstream.paired(get)

        await asyncio.sleep(HOLD)
        assert server_get.chunks == []  # nothing was sent: the stream was idle for the whole hold
        assert get.ended is None and get.closed is None, "the client saw the stream end"
        assert server_get.ended is None and server_get.closed is None, "the upstream saw the client go"
        assert [e.method for e in wire.exchanges].count("GET") == 1

        token = uuid.uuid4().hex
        result = await client.call_tool("announce", {"text": token})
        assert result.content[0].text == "announced"
        await eventually(lambda: any(p.data == token for _, p in logs), what="the log notification")

    (arrived, params), = [(t, p) for t, p in logs if p.data == token]
    assert params.logger == "announce" and params.level == "info"
    # It came on the GET stream (the standalone channel), not on the tool call's response.
    assert token.encode() in get.body
    assert [e.method for e in wire.exchanges if token.encode() in e.body] == ["GET"]
    ((sent, _),) = sent_events(server_get, token.encode())
    ((received, _),) = sent_events(get, token.encode())
    assert received - sent < LIVE
    assert arrived >= received
    assert sent - get.response_started >= HOLD  # delivered on the very stream opened before the hold
