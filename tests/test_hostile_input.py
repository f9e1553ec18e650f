"""Hostile and odd HTTP/1.1 input, written byte by byte on raw sockets to a running gateway.

Every refused request must get the right status and a SPEC §3.3 JSON error body, must not reach
any upstream, and must leave the gateway serving the next client. Odd-but-valid requests must be
routed by their normalised form (SPEC §3.1), which is also what the upstream receives.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from gateway.server.handler import Settings
from tests.support.echo import make_echo_app
from tests.support.harness import GATEWAY, backend, route_to, running_gateway, url
from tests.support.rawhttp import RawResponse, raw_connection, read_response, request, send

HOST = "gw.example"
BODY_LIMIT = 1024


def routes(ports: dict[str, int]) -> str:
    """gw.example: Exact /api/admin → exact, PathPrefix /api → api, the rest → main.
    Any other host → other."""

    def ref(name: str) -> str:
        return f"[{{group: gateway.envoyproxy.io, kind: Backend, name: {name}}}]"

    return GATEWAY + "".join(backend(name, port) for name, port in ports.items()) + f"""\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: site, namespace: infra}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: [{HOST}]
  rules:
  - matches: [{{path: {{type: Exact, value: /api/admin}}}}]
    backendRefs: {ref("exact")}
  - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
    backendRefs: {ref("api")}
  - backendRefs: {ref("main")}
""" + route_to("other")


# --- upstreams that remember what reached them --------------------------------------------


@dataclass
class Upstreams:
    arrived: list[tuple[str, str]] = field(default_factory=list)  # request heads that reached any echo
    answered: list[tuple[str, str]] = field(default_factory=list)  # requests an echo answered


def counting_echo(name: str, seen: Upstreams):
    app = make_echo_app(name)

    @web.middleware
    async def record(request, handler):
        seen.arrived.append((name, request.raw_path))
        response = await handler(request)
        seen.answered.append((name, request.raw_path))
        return response

    app.middlewares.append(record)
    return app


@pytest.fixture
async def gateway(aiohttp_server, tmp_path):
    seen = Upstreams()
    ports = {}
    for name in ("exact", "api", "main", "other"):
        server = await aiohttp_server(counting_echo(name, seen), host="127.0.0.1")
        ports[name] = server.port
    async with running_gateway(tmp_path, routes(ports), settings=Settings(max_body_bytes=BODY_LIMIT)) as gw:
        gw.seen = seen
        yield gw


# --- raw requests -------------------------------------------------------------------------


def get(target: str, *headers: str, host: str | None = HOST) -> bytes:
    host_line = () if host is None else (f"Host: {host}",)
    return request(f"GET {target} HTTP/1.1", *host_line, *headers)


async def assert_still_serving(gw) -> None:
    (response,) = await send(gw, get("/after"))
    assert response.status == 200
    assert response.json()["backend"] == "main"


def assert_error_body(response: RawResponse, status: int | tuple[int, ...]) -> None:
    expected = status if isinstance(status, tuple) else (status,)
    # A request whose version could not be parsed may get an HTTP/1.0 answer; never 0.9.
    assert response.version in ("HTTP/1.0", "HTTP/1.1") and response.status in expected, (
        response.version, response.status, response.body[:300])
    assert (response.header("Content-Type") or "").startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message", "request_id"}, body
    assert all(isinstance(body[k], str) and body[k] for k in body), body
    if response.header("X-Request-Id") is not None:
        assert response.header("X-Request-Id") == body["request_id"]


# --- refused requests ----------------------------------------------------------------------

BIG = "x" * 1024
CHUNKED_OVER_LIMIT = b"".join(b"%x\r\n%s\r\n" % (1000, b"y" * 1000) for _ in range(3)) + b"0\r\n\r\n"

# (id, raw request, status); none of these may reach an upstream.
REFUSED = [
    ("garbage-request-line", b"\x16\x03\x01 hello there\r\n\r\n", 400),
    ("missing-version", request("GET /", f"Host: {HOST}"), 400),
    ("bad-method-chars", request("G(E)T / HTTP/1.1", f"Host: {HOST}"), 400),
    # HTTP/2 prior knowledge on an HTTP/1.1-only port: nginx answers 505, Envoy 400.
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400, 505)),
    ("header-without-colon", request("GET / HTTP/1.1", f"Host: {HOST}", "NoColonHere"), 400),
    ("header-name-with-space", request("GET / HTTP/1.1", f"Host: {HOST}", "Bad Name: x"), 400),
    ("obs-fold", request("GET / HTTP/1.1", f"Host: {HOST}", "X-Folded: a", "  continued"), 400),
    ("nul-in-header-value", request("GET / HTTP/1.1", f"Host: {HOST}", "X-Bad: a\x00b"), 400),
    ("cr-in-header-value", request("GET / HTTP/1.1", f"Host: {HOST}", "X-Bad: a\rb"), 400),
    (
        "content-length-and-chunked",
        request("POST / HTTP/1.1", f"Host: {HOST}", "Content-Length: 5", "Transfer-Encoding: chunked",
                body=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: gw.example\r\n\r\n"),
        400,
    ),
    ("duplicate-content-length-same", request("POST / HTTP/1.1", f"Host: {HOST}", "Content-Length: 3",
                                               "Content-Length: 3", body=b"abc"), 400),
    ("duplicate-content-length-differ", request("POST / HTTP/1.1", f"Host: {HOST}", "Content-Length: 3",
                                                 "Content-Length: 4", body=b"abcd"), 400),
    ("content-length-not-a-number", request("POST / HTTP/1.1", f"Host: {HOST}", "Content-Length: abc",
                                             body=b"abc"), 400),
    ("content-length-negative", request("POST / HTTP/1.1", f"Host: {HOST}", "Content-Length: -1", body=b"a"), 400),
    ("content-length-plus-sign", request("POST / HTTP/1.1", f"Host: {HOST}", "Content-Length: +3", body=b"abc"), 400),
    # RFC 9112 §6.1: an unknown transfer coding is 501, chunked not last is 400.
    ("te-gzip-chunked", request("POST / HTTP/1.1", f"Host: {HOST}", "Transfer-Encoding: gzip, chunked",
                                body=b"3\r\nabc\r\n0\r\n\r\n"), (400, 501)),
    ("te-chunked-identity", request("POST / HTTP/1.1", f"Host: {HOST}", "Transfer-Encoding: chunked, identity",
                                    body=b"3\r\nabc\r\n0\r\n\r\n"), 400),
    ("te-split-gzip-then-chunked", request("POST / HTTP/1.1", f"Host: {HOST}", "Transfer-Encoding: gzip",
                                           "Transfer-Encoding: chunked", body=b"3\r\nabc\r\n0\r\n\r\n"), (400, 501)),
    ("te-chunked-twice", request("POST / HTTP/1.1", f"Host: {HOST}", "Transfer-Encoding: chunked, chunked",
                                 body=b"3\r\nabc\r\n0\r\n\r\n"), 400),
    ("te-unknown", request("POST / HTTP/1.1", f"Host: {HOST}", "Transfer-Encoding: xchunked",
                           body=b"3\r\nabc\r\n0\r\n\r\n"), (400, 501)),
    ("header-line-over-64k", request("GET / HTTP/1.1", f"Host: {HOST}", "X-Big: " + "x" * 70_000), 431),
    ("headers-total-over-64k", request("GET / HTTP/1.1", f"Host: {HOST}",
                                       *(f"X-H{i}: {BIG}" for i in range(70))), 431),
    ("300-headers", request("GET / HTTP/1.1", f"Host: {HOST}", *(f"X-H{i}: v" for i in range(300))), 431),
    ("body-over-limit-by-length", request("POST / HTTP/1.1", f"Host: {HOST}", "Content-Length: 2000",
                                          body=b"z" * 2000), 413),
    ("path-with-raw-space", request("GET /a b HTTP/1.1", f"Host: {HOST}"), 400),
    ("path-with-control-char", request("GET /a\x01b HTTP/1.1", f"Host: {HOST}"), 400),
    ("path-with-del", request("GET /a\x7fb HTTP/1.1", f"Host: {HOST}"), 400),
    ("path-bad-escape", get("/a/%zz"), 400),
    ("path-truncated-escape", get("/a/%4"), 400),
    ("two-host-headers", request("GET / HTTP/1.1", f"Host: {HOST}", "Host: other.example"), 400),
    ("empty-host", get("/", host=""), 400),
    ("missing-host-http11", get("/", host=None), 400),
    ("host-with-userinfo", get("/", host=f"evil.com@{HOST}"), 400),
    ("host-with-bad-port", get("/", host=f"{HOST}:80x"), 400),
    ("host-with-slash", get("/", host=f"{HOST}/x"), 400),
]


@pytest.mark.parametrize("raw,status", [pytest.param(raw, status, id=id_) for id_, raw, status in REFUSED])
async def test_refused_request_gets_an_error_body_and_never_reaches_an_upstream(gateway, raw, status):
    (response,) = await send(gateway, raw)

    assert_error_body(response, status)
    assert gateway.seen.arrived == []
    await assert_still_serving(gateway)


# Body errors are found while the body streams, after the head may have gone upstream
# (SPEC §3.1: nothing is buffered whole); the upstream must never see a complete request.
BODY_REFUSED = [
    ("invalid-chunk-size", request("POST / HTTP/1.1", f"Host: {HOST}", "Transfer-Encoding: chunked",
                                   body=b"zz\r\nabc\r\n0\r\n\r\n"), 400),
    ("chunk-size-overflow", request("POST / HTTP/1.1", f"Host: {HOST}", "Transfer-Encoding: chunked",
                                    body=b"fffffffffffffffffff1\r\nabc\r\n0\r\n\r\n"), 400),
    ("body-over-limit-chunked", request("POST / HTTP/1.1", f"Host: {HOST}", "Transfer-Encoding: chunked",
                                        body=CHUNKED_OVER_LIMIT), 413),
]


@pytest.mark.parametrize("raw,status", [pytest.param(raw, status, id=id_) for id_, raw, status in BODY_REFUSED])
async def test_refused_body_gets_an_error_and_the_upstream_never_answers_it(gateway, raw, status):
    (response,) = await send(gateway, raw)

    assert_error_body(response, status)
    await assert_still_serving(gateway)
    assert gateway.seen.answered == [("main", "/after")]


# --- odd but valid requests: routed by their normalised form --------------------------------

# (id, raw request, backend, path the upstream sees)
ROUTED = [
    ("dot-dot-leaves-api", get("/api/../admin"), "main", "/admin"),
    ("encoded-dot-dot-leaves-api", get("/api/%2e%2e/admin"), "main", "/admin"),
    ("encoded-dot-dot-upper", get("/api/%2E%2E/admin"), "main", "/admin"),
    ("encoded-slash-stays-encoded", get("/api%2Fadmin"), "main", "/api%2Fadmin"),
    ("encoded-slash-inside-prefix", get("/api/x%2F..%2Fy"), "api", "/api/x%2F..%2Fy"),
    ("double-slashes-merged", get("//api//x"), "api", "/api/x"),
    ("single-dot-removed", get("/a/./b"), "main", "/a/b"),
    ("dot-dot-above-root", get("/../../api/x"), "api", "/api/x"),
    ("exact-still-exact", get("/api/admin"), "exact", "/api/admin"),
    ("host-with-port", get("/x", host=f"{HOST}:8080"), "main", "/x"),
    ("host-upper-case", get("/x", host=HOST.upper()), "main", "/x"),
    ("host-trailing-dot", get("/x", host=HOST + "."), "main", "/x"),
    ("other-host", get("/api/x", host="other.example"), "other", "/api/x"),
    ("absolute-form-uses-its-authority", get(f"http://{HOST}/api/x", host="other.example"), "api", "/api/x"),
]


@pytest.mark.parametrize(
    "raw,backend_name,path", [pytest.param(raw, b, p, id=id_) for id_, raw, b, p in ROUTED]
)
async def test_odd_request_is_routed_by_its_normalised_form(gateway, raw, backend_name, path):
    (response,) = await send(gateway, raw)

    assert response.status == 200, response.body[:300]
    echo = response.json()
    assert (echo["backend"], echo["path"]) == (backend_name, path)
    assert gateway.seen.arrived == [(backend_name, path)]


async def test_absolute_form_target_replaces_the_host_header_upstream(gateway):
    # RFC 9112 §3.2.2: the target's authority wins over Host; what was routed is what is forwarded.
    (response,) = await send(gateway, get(f"http://{HOST}/x", host="other.example"))

    echo = response.json()
    assert echo["backend"] == "main"
    assert [v for k, v in echo["headers"] if k.lower() == "host"] == [HOST]


# --- connection behaviour ------------------------------------------------------------------


async def test_partial_request_then_close_harms_nothing(gateway):
    host, port = next(iter(gateway.addresses.values()))
    for partial in (b"GET /api/x HTTP/1.1\r\nHost: gw.exa", b"POST / HTTP/1.1\r\nHost: gw.example\r\n"
                    b"Content-Length: 100\r\n\r\nonly-part-of-it", b"G"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(partial)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    await assert_still_serving(gateway)
    assert ("main", "/after") in gateway.seen.answered
    assert all(path == "/after" for _, path in gateway.seen.answered)


async def test_expect_100_continue_gets_the_interim_response_before_the_body_is_sent(gateway):
    async with raw_connection(gateway) as (reader, writer):
        writer.write(request("POST /upload-here HTTP/1.1", f"Host: {HOST}", "Content-Length: 5",
                             "Expect: 100-continue"))
        await writer.drain()
        interim = await read_response(reader)
        assert interim.status == 100
        writer.write(b"hello")
        await writer.drain()
        final = await read_response(reader)

    assert final.status == 200
    echo = final.json()
    assert (echo["path"], echo["body_length"]) == ("/upload-here", 5)


async def test_pipelined_requests_are_answered_in_order(gateway):
    raw = get("/first", "X-Echo-Delay: 0.2") + get("/second") + get("/api/third")

    responses = await send(gateway, raw, responses=3)

    assert [r.status for r in responses] == [200, 200, 200]
    assert [r.json()["path"] for r in responses] == ["/first", "/second", "/api/third"]


async def test_the_gateways_own_answers_do_not_name_the_server_software(echo_servers, tmp_path):
    """Errors, redirects and metadata made by the gateway say `Server: sandgate`, not the
    library and version an attacker could look up."""
    async with running_gateway(tmp_path, GATEWAY) as gw, aiohttp.ClientSession() as session:
        async with session.get(url(gw, "/nothing-routes-here")) as resp:
            assert resp.status == 404
            assert resp.headers.getall("Server") == ["sandgate"]
