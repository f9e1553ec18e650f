"""What a user of the proxy sees (SPEC §3.1, §3.3): through a running gateway to real upstreams.

Upstreams: the shared echo server; `probe`, a small app of this file for what the echo cannot
show (peer ports, pre-gzipped bodies, body digests, stalls, cancellation); `bad`, a raw TCP server
that answers with broken HTTP; and a closed port.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import hashlib
import random
import re
from contextlib import asynccontextmanager
from time import monotonic

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.server.handler import Settings
from tests.support.echo import make_echo_app
from tests.support.harness import GATEWAY, backend, free_port, running_gateway, url
from tests.support.rawhttp import raw_connection, read_response, request, send

MiB = 1024 * 1024
RAW_TIMEOUT = 10.0


def routes(ports: dict[str, int]) -> str:
    def rule(prefix: str, name: str, timeouts: str = "") -> str:
        return (f"  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]\n"
                f"    backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: {name}}}]\n"
                + (f"    timeouts: {timeouts}\n" if timeouts else ""))

    return GATEWAY + "".join(backend(name, port) for name, port in ports.items()) + (
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        "metadata: {name: app, namespace: infra}\nspec:\n  parentRefs: [{name: gw}]\n  rules:\n"
        + rule("/probe", "probe")
        + rule("/bad", "bad")
        + rule("/refused", "refused")
        + rule("/timeout-request", "echo", "{request: 500ms}")
        + rule("/timeout-backend", "echo", "{backendRequest: 500ms}")
        + rule("/", "echo")
    )


# --- the probe upstream ---------------------------------------------------------------------


class Probe:
    """Remembers what happened to its requests; events are keyed by the request's ?id=."""

    def __init__(self):
        self.started: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.gone: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.app = web.Application(client_max_size=0)
        for path, handler in [("/probe/peer", self.peer), ("/probe/gzip", self.gzip), ("/probe/digest", self.digest),
                              ("/probe/hang", self.hang), ("/probe/drip", self.drip), ("/probe/stall", self.stall),
                              ("/probe/sized", self.sized)]:
            self.app.router.add_route("*", path, handler)

    async def peer(self, request):
        size = int(request.query.get("size", "0"))
        return web.Response(body=b"p" * size, headers={"X-Peer-Port": str(request.transport.get_extra_info("peername")[1])})

    async def sized(self, request):
        # web.Response, unlike the echo's streamed /bytes, sends no body to a HEAD request.
        return web.Response(body=b"h" * int(request.query["n"]))

    async def gzip(self, request):
        return web.Response(body=gzipped(int(request.query["n"])),
                            headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"})

    async def digest(self, request):
        body = await request.read()
        return web.json_response({
            "sha256": hashlib.sha256(body).hexdigest(),
            "content_length": request.headers.get("Content-Length"),
            "transfer_encoding": request.headers.get("Transfer-Encoding"),
        })

    async def hang(self, request):
        key = request.query["id"]
        self.started[key].set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.gone[key].set()
            raise
        return web.Response(text="too late")

    async def drip(self, request):
        key = request.query["id"]
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(500):
                await response.write(b"d" * 1024)
                self.started[key].set()
                await asyncio.sleep(0.02)
        except (asyncio.CancelledError, ConnectionError):
            self.gone[key].set()
            raise
        return response

    async def stall(self, request):
        """Sends `sent` bytes of a `length`-byte body (chunked when length is 0), then stalls."""
        length, sent = int(request.query["length"]), int(request.query["sent"])
        response = web.StreamResponse()
        if length:
            response.content_length = length
        await response.prepare(request)
        await response.write(b"s" * sent)
        await asyncio.sleep(30)
        return response


def gzipped(n: int) -> bytes:
    return gzip.compress(random.Random(n).randbytes(n), mtime=0)


async def bad_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a request head, then misbehaves as its path says."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1]
        answers = {b"/bad/close": b"", b"/bad/mid-headers": b"HTTP/1.1 200 OK\r\nContent-Le",
                   b"/bad/garbage": b"SURPRISE\r\n\r\n", b"/bad/mid-status": b"HTTP/1.1 2"}
        writer.write(answers.get(path, b""))
        await writer.drain()
    finally:
        writer.close()


class Stack:
    def __init__(self, tmp_path, ports, probe):
        self.tmp_path = tmp_path
        self.ports = ports
        self.probe = probe
        self._count = 0

    @asynccontextmanager
    async def gateway(self, settings: Settings | None = None):
        self._count += 1
        directory = self.tmp_path / f"gw{self._count}"
        directory.mkdir()
        async with running_gateway(directory, routes(self.ports), settings=settings) as gw:
            yield gw


@pytest.fixture
async def stack(aiohttp_server, tmp_path):
    echo = await aiohttp_server(make_echo_app("echo"), host="127.0.0.1")
    probe = Probe()
    probe_server = await aiohttp_server(probe.app, host="127.0.0.1")  # test servers cancel handlers
    bad = await asyncio.start_server(bad_upstream, "127.0.0.1", 0)
    ports = {"echo": echo.port, "probe": probe_server.port, "bad": bad.sockets[0].getsockname()[1],
             "refused": free_port()}
    yield Stack(tmp_path, ports, probe)
    bad.close()
    await bad.wait_closed()


@pytest.fixture
async def gw(stack):
    async with stack.gateway() as running:
        yield running


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


# --- helpers --------------------------------------------------------------------------------


def target(gw, path: str) -> URL:
    return URL(url(gw, path), encoded=True)


def upstream_values(echo: dict, name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


def rss() -> int:
    """Resident set size of this process (the gateway runs in it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def raw_get(gw, path: str, *headers: str):
    (response,) = await send(gw, request(f"GET {path} HTTP/1.1", "Host: app.example", *headers), timeout=RAW_TIMEOUT)
    return response


def assert_json_error(status: int, content_type: str, body: dict, expected_status: int) -> None:
    assert status == expected_status, body
    assert content_type == "application/json"
    assert set(body) == {"error", "message", "request_id"}
    assert all(isinstance(v, str) and v for v in body.values())


# --- streaming ------------------------------------------------------------------------------


async def test_sse_events_arrive_one_by_one(gw, http):
    n, interval = 5, 0.25
    arrivals = []
    async with http.get(target(gw, f"/sse?n={n}&interval={interval}")) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        async for line in resp.content:
            if line.startswith(b"data:"):
                arrivals.append(monotonic())
        ended = monotonic()

    assert len(arrivals) == n
    # A buffering proxy delivers everything at the end, in one burst.
    spread = (n - 1) * interval
    assert arrivals[-1] - arrivals[0] >= 0.6 * spread
    assert ended - arrivals[0] >= 0.6 * spread


async def test_long_sse_stream_outlives_the_idle_timeout_when_events_keep_coming(stack, http):
    async with stack.gateway(Settings(idle_timeout=0.5)) as gw:
        async with http.get(target(gw, "/sse?n=8&interval=0.2")) as resp:
            body = await resp.read()

    assert resp.status == 200
    assert body.count(b"data: event") == 8


async def test_large_download_streams_without_buffering(gw, http):
    total = 256 * MiB
    async with http.get(target(gw, f"/bytes?n={4 * MiB}")) as resp:  # warm the pools and buffers
        await resp.read()
    baseline = peak = rss()
    received = 0
    async with http.get(target(gw, f"/bytes?n={total}")) as resp:
        async for chunk in resp.content.iter_chunked(MiB):
            received += len(chunk)
            if received % (8 * MiB) < len(chunk):
                peak = max(peak, rss())

    assert received == total
    assert peak - baseline <= 64 * MiB, f"RSS grew by {(peak - baseline) // MiB} MiB"


async def test_large_streamed_upload_passes_without_buffering(gw, http):
    total, piece = 256 * MiB, b"u" * MiB
    samples = []

    async def body():
        for i in range(total // MiB):
            if i % 8 == 0:
                samples.append(rss())
            yield piece

    baseline = rss()
    async with http.post(target(gw, "/upload"), data=body()) as resp:
        result = await resp.json()
    samples.append(rss())

    assert result["received"] == total
    assert max(samples) - baseline <= 64 * MiB, f"RSS grew by {(max(samples) - baseline) // MiB} MiB"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [10, MiB])
async def test_request_body_arrives_intact(gw, http, size, chunked):
    payload = random.Random(size).randbytes(size)

    async def pieces():
        for i in range(0, size, 65536):
            yield payload[i : i + 65536]

    async with http.post(target(gw, "/probe/digest"), data=pieces() if chunked else payload) as resp:
        seen = await resp.json()

    assert seen["sha256"] == hashlib.sha256(payload).hexdigest()
    if chunked:
        assert (seen["transfer_encoding"], seen["content_length"]) == ("chunked", None)
    else:
        assert (seen["transfer_encoding"], seen["content_length"]) == (None, str(size))


@pytest.mark.parametrize("size", [1000, 2 * MiB])
async def test_gzip_body_passes_byte_identical_and_undecoded(gw, http, size):
    async with http.get(target(gw, f"/probe/gzip?n={size}"), headers={"Accept-Encoding": "gzip"}) as resp:
        body = await resp.read()

    expected = gzipped(size)
    assert resp.headers.getall("Content-Encoding") == ["gzip"]
    assert resp.headers.get("Content-Length") == str(len(expected))
    assert body == expected


# --- headers --------------------------------------------------------------------------------

HOP_REQUEST = (
    "Connection: keep-alive, X-Custom-Hop",
    "X-Custom-Hop: secret",
    "Keep-Alive: timeout=5",
    "TE: trailers",
    "Upgrade: h2c",
    "Proxy-Connection: keep-alive",
    "Mcp-Session-Id: sess-1",
    "Mcp-Param-X: one",
    "X-Multi: a",
    "Mcp-Param-X: two",
    "X-Multi: b",
    "X-Echo-Set: Connection: X-Resp-Hop",
    "X-Echo-Set: X-Resp-Hop: secret",
    "X-Echo-Set: Keep-Alive: timeout=5",
    "X-Echo-Set: Proxy-Connection: keep-alive",
    "X-Echo-Set: Upgrade: h2c",
    "X-Echo-Set: Mcp-Session-Id: sess-2",
    "X-Echo-Set: Set-Cookie: a=1",
    "X-Echo-Set: Set-Cookie: b=2",
)


async def test_hop_by_hop_headers_are_removed_both_ways_and_the_rest_pass_in_order(gw):
    response = await raw_get(gw, "/hop", *HOP_REQUEST)
    echo = response.json()

    for name in ("X-Custom-Hop", "Keep-Alive", "TE", "Upgrade", "Proxy-Connection"):
        assert upstream_values(echo, name) == [], name
    assert "custom-hop" not in ",".join(upstream_values(echo, "Connection")).lower()
    assert upstream_values(echo, "Mcp-Session-Id") == ["sess-1"]
    assert upstream_values(echo, "Mcp-Param-X") == ["one", "two"]
    assert upstream_values(echo, "X-Multi") == ["a", "b"]

    for name in ("X-Resp-Hop", "Keep-Alive", "Upgrade", "Proxy-Connection"):
        assert response.header(name) is None, name
    assert "resp-hop" not in (response.header("Connection") or "").lower()
    assert response.header("Mcp-Session-Id") == "sess-2"
    assert [v for k, v in response.headers if k.lower() == "set-cookie"] == ["a=1", "b=2"]


async def test_h2c_upgrade_is_not_forwarded(gw):
    response = await raw_get(gw, "/h2c", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
                             "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")

    assert response.status == 200
    echo = response.json()
    assert upstream_values(echo, "Upgrade") == []
    assert upstream_values(echo, "HTTP2-Settings") == []


async def test_forwarded_headers_are_appended_and_set(gw, http):
    headers = {"Host": "app.example", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    async with http.get(target(gw, "/fwd"), headers=headers) as resp:
        echo = await resp.json()

    assert upstream_values(echo, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    # No trusted hops are configured: the client's claim about the scheme is not believed.
    assert upstream_values(echo, "X-Forwarded-Proto") == ["http"]
    assert upstream_values(echo, "X-Forwarded-Host") == ["app.example"]
    assert upstream_values(echo, "Host") == ["app.example"]


@pytest.mark.parametrize(
    "incoming,kept",
    [(None, False), ("abc-123.x:y_z", True), ("r" * 500, False), ("has spaces in it", False), ("", False)],
    ids=["absent", "valid", "too-long", "spaces", "empty"],
)
async def test_request_id_is_kept_or_generated_and_returned(gw, http, incoming, kept):
    headers = {} if incoming is None else {"X-Request-Id": incoming}
    async with http.get(target(gw, "/rid"), headers=headers) as resp:
        echo = await resp.json()

    returned = resp.headers.getall("X-Request-Id")
    assert len(returned) == 1
    assert upstream_values(echo, "X-Request-Id") == returned
    if kept:
        assert returned == [incoming]
    else:
        assert returned != [incoming]
        assert re.fullmatch(r"[A-Za-z0-9._:-]{8,200}", returned[0])


@pytest.mark.parametrize("path,extra", [
    ("/date", ()),
    (f"/bytes?n={200_000}", ()),
    ("/sse?n=1&interval=0", ()),
    ("/status/204", ()),
    ("/refused", ()),
    ("/timeout-request/x", ("X-Echo-Delay: 2",)),
])
async def test_no_duplicate_date_or_server_header(gw, path, extra):
    response = await raw_get(gw, path, *extra)

    names = collections.Counter(name.lower() for name, _ in response.headers)
    assert names["date"] == 1, response.headers
    assert names["server"] <= 1, response.headers


# --- methods and statuses -------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 1_000_000])
async def test_head_keeps_content_length_and_sends_no_body(gw, size):
    async with raw_connection(gw, RAW_TIMEOUT) as (reader, writer):
        writer.write(request(f"HEAD /probe/sized?n={size} HTTP/1.1", "Host: app.example")
                     + request("GET /after HTTP/1.1", "Host: app.example"))
        head = await read_response(reader, head=True)
        after = await read_response(reader)  # garbles if the HEAD answer carried a body

    assert head.status == 200
    assert head.header("Content-Length") == str(size)
    assert after.status == 200 and after.json()["path"] == "/after"


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_pass(gw, status):
    async with raw_connection(gw, RAW_TIMEOUT) as (reader, writer):
        writer.write(request(f"GET /status/{status} HTTP/1.1", "Host: app.example")
                     + request("GET /after HTTP/1.1", "Host: app.example"))
        first = await read_response(reader)
        after = await read_response(reader)

    assert first.status == status
    assert first.header("Transfer-Encoding") is None
    assert after.status == 200 and after.json()["path"] == "/after"


# --- upstream connections -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 200_000], ids=["small", "streamed"])
async def test_upstream_connections_are_pooled(gw, http, size):
    ports = set()
    for _ in range(20):
        async with http.get(target(gw, f"/probe/peer?size={size}")) as resp:
            await resp.read()
            ports.add(resp.headers["X-Peer-Port"])

    assert len(ports) <= 2, ports


@pytest.mark.parametrize("path", ["/probe/hang", "/probe/drip"], ids=["before-headers", "mid-body"])
async def test_client_disconnect_cancels_the_upstream_request(stack, gw, path):
    key = path.rsplit("/", 1)[1]

    async def client():
        async with aiohttp.ClientSession() as session:
            async with session.get(target(gw, f"{path}?id={key}")) as resp:
                await resp.content.readany()
                await asyncio.sleep(30)

    task = asyncio.ensure_future(client())
    async with asyncio.timeout(5):
        await stack.probe.started[key].wait()
        if key == "drip":
            await asyncio.sleep(0.05)  # let the first bytes reach the client
        task.cancel()  # closes the client's connection
        await stack.probe.gone[key].wait()


@pytest.mark.parametrize("path", ["/refused/x", "/bad/close", "/bad/mid-status", "/bad/mid-headers", "/bad/garbage"])
async def test_upstream_failure_before_the_response_is_502(gw, http, path):
    async with http.get(target(gw, path)) as resp:
        body = await resp.json()

    assert_json_error(resp.status, resp.content_type, body, 502)


@pytest.mark.parametrize("path", ["/timeout-request/x", "/timeout-backend/x"])
async def test_rule_timeouts_answer_504(gw, http, path):
    started = monotonic()
    async with http.get(target(gw, path), headers={"X-Echo-Delay": "3"}) as resp:
        body = await resp.json()

    assert_json_error(resp.status, resp.content_type, body, 504)
    assert monotonic() - started < 2


@pytest.mark.parametrize("length,sent", [(200_000, 100_000), (0, 100_000), (10_000, 5_000)],
                         ids=["content-length", "chunked", "small"])
async def test_response_stalling_mid_body_hits_the_idle_timeout(stack, http, length, sent):
    async with stack.gateway(Settings(idle_timeout=0.5)) as gw:
        started = monotonic()
        async with asyncio.timeout(5):  # a hang fails here
            async with http.get(target(gw, f"/probe/stall?length={length}&sent={sent}")) as resp:
                if resp.status == 504:  # nothing had been sent yet: an honest error is fine too
                    return
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
    assert monotonic() - started < 3


# --- error pages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "accept,html",
    [
        (None, False),
        ("application/json", False),
        ("*/*", False),
        ("application/json, text/html;q=0.5", False),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
        ("text/html", True),
    ],
)
async def test_error_body_is_json_unless_html_is_preferred(gw, http, accept, html):
    headers = {"Accept": accept} if accept else {}
    async with http.get(target(gw, "/refused/x"), headers=headers, skip_auto_headers=["Accept"]) as resp:
        text = await resp.text()

    assert resp.status == 502
    request_id = resp.headers["X-Request-Id"]
    if html:
        assert resp.content_type == "text/html"
        assert "502" in text and request_id in text
    else:
        assert resp.content_type == "application/json"
        assert (await resp.json())["request_id"] == request_id
