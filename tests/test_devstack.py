"""The dev stack's stand-ins, each hit directly with real clients on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import time
from pathlib import Path

import aiohttp
import httpx2
import jwt as pyjwt
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthMetadata, ProtectedResourceMetadata
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from multidict import CIMultiDict
from yarl import URL

from gateway.config.loader import LoadOptions, load_routes
from gateway.devstack import (
    API_SERVICE,
    FRONTEND_SERVICE,
    MCP_SCOPE,
    MCP_SERVICE,
    start_devstack,
    try_commands,
    try_urls,
)
from gateway.devstack.policy import mcp_security_policy, write_policies
from gateway.devstack.urls import public_origin
from gateway.policy.loader import load_policies

REPO = Path(__file__).resolve().parents[1]

PUBLIC = "http://127.0.0.1:8080"
MODES = ["legacy", "auto"]  # the initialize-handshake era and the 2026 stateless era


@pytest.fixture
async def stack():
    stack = await start_devstack(PUBLIC + "/")
    yield stack
    await stack.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def url(stack, service: str, path: str) -> URL:
    host, port = stack.services[service]
    return URL(f"http://{host}:{port}{path}", encoded=True)


def mcp_url(stack) -> str:
    return str(url(stack, MCP_SERVICE, "/mcp"))


# --- the runner ---------------------------------------------------------------------------


async def test_services_map_the_three_cluster_addresses_to_distinct_loopback_ports(stack):
    assert set(stack.services) == {
        "api.platform.svc.cluster.local:8000",
        "mcp.platform.svc.cluster.local:8000",
        "frontend.platform.svc.cluster.local:3000",
    }
    assert {host for host, _ in stack.services.values()} == {"127.0.0.1"}
    assert len({port for _, port in stack.services.values()}) == 3
    assert stack.public_url == PUBLIC


async def test_stop_releases_every_port_and_is_idempotent():
    stack = await start_devstack(PUBLIC)
    addresses = list(stack.services.values())
    await stack.stop()
    await stack.stop()
    for host, port in addresses:
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=1).close()


@pytest.mark.parametrize("bad", ["ftp://x.example", "http://x.example/base", "http://x.example/?q=1", "example.com"])
async def test_a_public_url_that_is_not_an_origin_is_refused_before_anything_starts(bad):
    with pytest.raises(ValueError):
        await start_devstack(bad)


def test_public_origin_drops_the_trailing_slash_and_default_port():
    assert public_origin("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert public_origin("https://agents.example.com:443") == "https://agents.example.com"


def test_try_urls_cover_each_stand_in_under_the_public_origin():
    urls = try_urls("https://agents.example.com/")
    assert all(u.startswith("https://agents.example.com/") for u in urls)
    paths = {URL(u).path for u in urls}
    assert {"/", "/api/hello", "/api/events", "/mcp", "/mcp/health"} <= paths
    assert "/.well-known/oauth-protected-resource/mcp" in paths


def test_try_commands_curl_every_url_then_get_a_token_and_use_it():
    commands = try_commands("https://agents.example.com/")
    assert len(commands) == len(try_urls("https://agents.example.com")) + 2
    *plain, get_token, use_token = commands
    assert all(c.startswith("curl -i ") for c in plain)
    assert plain[-1] == "curl -i https://agents.example.com/mcp"  # the 401 comes first
    assert get_token.startswith("TOKEN=$(curl -s -X POST -d grant_type=client_credentials ")
    assert "https://agents.example.com/oauth/token |" in get_token
    assert '-H "Authorization: Bearer $TOKEN"' in use_token
    assert use_token.endswith(" https://agents.example.com/mcp")


# --- API stand-in ---------------------------------------------------------------------------


async def test_api_echo_reports_the_request_exactly_as_received(stack, http):
    body = b"x" * 300_000
    headers = CIMultiDict(
        [("X-Request-Id", "req-1"), ("X-Forwarded-For", "203.0.113.7"), ("X-Dup", "a"), ("X-Dup", "b")]
    )
    async with http.post(url(stack, API_SERVICE, "/api/things/a%2Fb?x=1&x=2"), data=body, headers=headers) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["service"] == "api"
    assert seen["method"] == "POST"
    assert seen["path"] == "/api/things/a%2Fb"
    assert seen["query"] == [["x", "1"], ["x", "2"]]
    assert ["X-Request-Id", "req-1"] in seen["headers"]
    assert ["X-Forwarded-For", "203.0.113.7"] in seen["headers"]
    assert [value for name, value in seen["headers"] if name == "X-Dup"] == ["a", "b"]
    assert seen["body"] == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert seen["remote"] == "127.0.0.1"


@pytest.mark.parametrize("path", ["/api", "/auth/login", "/oauth/userinfo", "/oauth/authorize?client_id=c"])
async def test_api_auth_and_oauth_prefixes_echo(stack, http, path):
    async with http.get(url(stack, API_SERVICE, path)) as resp:
        assert resp.status == 200
        assert (await resp.json())["path"] == URL(path).path


@pytest.mark.parametrize("path", ["/apix", "/authz", "/", "/mcp"])
async def test_api_prefixes_are_whole_path_elements(stack, http, path):
    async with http.get(url(stack, API_SERVICE, path)) as resp:
        assert resp.status == 404


@pytest.mark.parametrize("suffix", ["", "/mcp"])
async def test_authorization_server_metadata_names_the_public_origin(stack, http, suffix):
    async with http.get(url(stack, API_SERVICE, "/.well-known/oauth-authorization-server" + suffix)) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["issuer"] == PUBLIC
    assert doc["jwks_uri"] == PUBLIC + "/oauth/jwks"
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert "code" in doc["response_types_supported"]
    assert "authorization_code" in doc["grant_types_supported"]
    assert "client_credentials" in doc["grant_types_supported"]
    assert MCP_SCOPE in doc["scopes_supported"]
    parsed = OAuthMetadata.model_validate(doc)  # as the MCP SDK's OAuth client reads it
    assert str(parsed.token_endpoint) == PUBLIC + "/oauth/token"


@pytest.mark.parametrize("suffix", ["", "/mcp"])
async def test_openid_configuration_has_the_required_oidc_fields(stack, http, suffix):
    async with http.get(url(stack, API_SERVICE, "/.well-known/openid-configuration" + suffix)) as resp:
        doc = await resp.json()
    required = {
        "issuer",
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
    }
    assert required <= set(doc)
    assert doc["issuer"] == PUBLIC
    assert all(doc[k].startswith(PUBLIC + "/") for k in ("authorization_endpoint", "token_endpoint", "jwks_uri"))


async def test_jwks_serves_one_public_rsa_key(stack, http):
    async with http.get(url(stack, API_SERVICE, "/oauth/jwks")) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        jwks = await resp.json()
    (key,) = jwks["keys"]
    assert (key["kty"], key["kid"], key["use"], key["alg"]) == ("RSA", "dev-1", "sig", "RS256")
    assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys(), "private key material in the JWKS"
    assert len(pyjwt.PyJWK(key).key.public_numbers().n.to_bytes(256, "big")) == 256  # RSA 2048


async def test_every_start_has_its_own_key(stack, http):
    other = await start_devstack(PUBLIC)
    try:
        keys = []
        for s in (stack, other):
            async with http.get(url(s, API_SERVICE, "/oauth/jwks")) as resp:
                keys.append((await resp.json())["keys"][0]["n"])
    finally:
        await other.stop()
    assert keys[0] != keys[1]


async def request_token(stack, http, data) -> tuple[int, dict, dict]:
    async with http.post(url(stack, API_SERVICE, "/oauth/token"), data=data) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def verify(stack, http, token: str, audience: str) -> dict:
    """The token's claims, checked with pyjwt against the JWKS the stand-in serves."""
    async with http.get(url(stack, API_SERVICE, "/oauth/jwks")) as resp:
        key_set = pyjwt.PyJWKSet.from_dict(await resp.json())
    header = pyjwt.get_unverified_header(token)
    return pyjwt.decode(token, key_set[header["kid"]].key, algorithms=["RS256"], audience=audience, issuer=PUBLIC,
                        options={"require": ["exp", "iat", "sub"]})


async def test_client_credentials_token_verifies_against_the_served_jwks(stack, http):
    status, headers, body = await request_token(stack, http, {"grant_type": "client_credentials"})
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert body.keys() == {"access_token", "token_type", "expires_in", "scope"}
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 3600, MCP_SCOPE)
    header = pyjwt.get_unverified_header(body["access_token"])
    assert (header["alg"], header["kid"], header["typ"]) == ("RS256", "dev-1", "at+jwt")
    claims = await verify(stack, http, body["access_token"], PUBLIC + "/mcp")
    assert claims["iss"] == PUBLIC  # the issuer the discovery documents advertise
    assert claims["aud"] == PUBLIC + "/mcp"
    assert (claims["sub"], claims["scope"]) == ("dev-user", MCP_SCOPE)
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60


async def test_token_audience_is_the_resource_parameter_and_scope_as_asked(stack, http):
    data = {"grant_type": "client_credentials", "resource": PUBLIC + "/api", "scope": "openid email openid"}
    status, _, body = await request_token(stack, http, data)
    assert status == 200, body
    assert body["scope"] == "openid email"
    claims = await verify(stack, http, body["access_token"], PUBLIC + "/api")
    assert claims["aud"] == PUBLIC + "/api"
    assert claims["scope"] == "openid email"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({}, "invalid_request"),
        ([("grant_type", "client_credentials"), ("grant_type", "client_credentials")], "invalid_request"),
        ({"grant_type": "password", "username": "u", "password": "p"}, "unsupported_grant_type"),
        ({"grant_type": "client_credentials", "scope": "admin"}, "invalid_scope"),
        ({"grant_type": "client_credentials", "resource": "/mcp"}, "invalid_target"),
        ({"grant_type": "client_credentials", "resource": PUBLIC + "/mcp#x"}, "invalid_target"),
    ],
)
async def test_token_errors_follow_rfc_6749(stack, http, data, error):
    status, headers, body = await request_token(stack, http, data)
    assert status == 400
    assert headers["Cache-Control"] == "no-store"
    assert body["error"] == error and body["error_description"]


async def test_token_endpoint_takes_only_post(stack, http):
    async with http.get(url(stack, API_SERVICE, "/oauth/token")) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"


async def test_events_arrive_one_at_a_time(stack, http):
    start = time.monotonic()
    arrivals: list[tuple[float, dict]] = []
    async with http.get(url(stack, API_SERVICE, "/api/events?count=3")) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append((time.monotonic() - start, json.loads(line[6:])))
    assert [event for _, event in arrivals] == [{"n": 1, "of": 3}, {"n": 2, "of": 3}, {"n": 3, "of": 3}]
    # The first event is sent before the later ones exist: nothing is held back until the end.
    assert arrivals[0][0] < 0.4
    assert arrivals[2][0] - arrivals[0][0] >= 0.9


async def test_a_client_leaving_mid_stream_is_an_ordinary_end(stack, http, caplog):
    async with http.get(url(stack, API_SERVICE, "/api/events?count=5")) as resp:
        assert (await resp.content.readline()).startswith(b"id: 1")
    await asyncio.sleep(1.2)  # the next two writes find the connection gone
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("count", ["abc", "0", "101", "-1", "1e3", "\uff13", ""])
async def test_events_refuse_a_bad_count(stack, http, count):
    async with http.get(url(stack, API_SERVICE, "/api/events"), params={"count": count}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_request"


async def test_websocket_echoes_and_accepts_the_first_offered_subprotocol(stack, http):
    async with http.ws_connect(url(stack, API_SERVICE, "/api/ws"), protocols=("chat.v2", "chat.v1")) as ws:
        assert ws.protocol == "chat.v2"
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "hello"
        await ws.send_bytes(b"\x00\xff")
        assert await ws.receive_bytes(timeout=5) == b"\x00\xff"
        await ws.send_str("close 999")
        assert (await ws.receive_str(timeout=5)).startswith("error:")
        await ws.send_str("close 4001")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001


async def test_open_websockets_get_going_away_when_the_stack_stops(http):
    stack = await start_devstack(PUBLIC)
    try:
        ws = await http.ws_connect(url(stack, API_SERVICE, "/api/ws"))
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=5) == "ping"
        stopping = asyncio.create_task(stack.stop())
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
        await ws.close()
        await stopping
    finally:
        await stack.stop()


# --- MCP stand-in ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_mcp_sdk_client_lists_and_calls_tools(stack, mode):
    async with Client(mcp_url(stack), mode=mode) as client:
        expected = HANDSHAKE_PROTOCOL_VERSIONS if mode == "legacy" else MODERN_PROTOCOL_VERSIONS
        assert client.protocol_version in expected
        assert client.server_info.name == "sandgate-dev-mcp"
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert {"echo", "add", "slow_count", "request_headers"} <= tools
        echoed = await client.call_tool("echo", {"text": "héllo"})
        assert not echoed.is_error
        assert echoed.content[0].text == "héllo"
        summed = await client.call_tool("add", {"a": 2, "b": 40})
        assert summed.structured_content == {"result": 42}


@pytest.mark.parametrize("mode", MODES)
async def test_mcp_progress_notifications_arrive_while_the_tool_runs(stack, mode):
    start = time.monotonic()
    progress: list[tuple[float, float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((time.monotonic() - start, value, total, message))

    async with Client(mcp_url(stack), mode=mode) as client:
        start = time.monotonic()
        result = await client.call_tool("slow_count", {"n": 4, "delay": 0.3}, progress_callback=on_progress)
        done = time.monotonic() - start
    assert result.content[0].text == "counted to 4"
    assert [(value, total) for _, value, total, _ in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert progress[0][3] == "step 1 of 4"
    # Live, not batched with the result: the first step lands long before the call returns.
    assert progress[0][0] < done - 0.6


@pytest.mark.parametrize(("arguments", "field"), [({"n": 0}, "n"), ({"n": 51}, "n"), ({"n": 2, "delay": 60}, "delay")])
async def test_mcp_slow_count_refuses_out_of_range_arguments(stack, arguments, field):
    async with Client(mcp_url(stack), mode="legacy") as client:
        tool = next(t for t in (await client.list_tools()).tools if t.name == "slow_count")
        assert tool.input_schema["properties"]["n"]["maximum"] == 50  # the bounds are advertised
        result = await client.call_tool("slow_count", arguments)
        assert result.is_error
        assert f"\n{field}\n" in result.content[0].text


async def test_mcp_request_headers_tool_shows_what_the_server_received(stack):
    async with httpx2.AsyncClient(headers={"X-Probe": "forwarded"}) as http_client:
        transport = streamable_http_client(mcp_url(stack), http_client=http_client)
        async with Client(transport, mode="legacy") as client:
            result = await client.call_tool("request_headers", {})
    headers = dict(result.structured_content["result"])
    assert headers["x-probe"] == "forwarded"
    assert headers["mcp-session-id"]  # the session era's header reached the server
    assert headers["host"] == str(url(stack, MCP_SERVICE, "").authority)


async def test_mcp_health_and_protected_resource_metadata(stack, http):
    async with http.get(url(stack, MCP_SERVICE, "/healthz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
        async with http.get(url(stack, MCP_SERVICE, path)) as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert doc["resource"] == PUBLIC + "/mcp"
        assert doc["authorization_servers"] == [PUBLIC]
        assert doc["bearer_methods_supported"] == ["header"]
        assert doc["scopes_supported"] == [MCP_SCOPE]
        ProtectedResourceMetadata.model_validate(doc)  # as the MCP SDK's OAuth client reads it


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("public", "host", "status"),
    [
        (PUBLIC, "127.0.0.1:8080", 200),  # the gateway keeps Host: the public one must pass
        ("https://agents.example.com", "agents.example.com", 200),
        ("https://agents.example.com", "mcp.platform.svc.cluster.local:8000", 200),
        ("https://agents.example.com", "evil.example", 421),  # DNS rebinding protection stays on
        ("https://agents.example.com", "agents.example.com.evil.example", 421),
    ],
)
async def test_mcp_admits_the_public_host_and_refuses_others(http, public, host, status):
    stack = await start_devstack(public)
    try:
        async with http.post(
            url(stack, MCP_SERVICE, "/mcp"), json=INITIALIZE, headers={**MCP_HEADERS, "Host": host}
        ) as resp:
            assert resp.status == status
    finally:
        await stack.stop()


# --- frontend stand-in ----------------------------------------------------------------------


async def test_frontend_index_lists_the_urls_to_try(stack, http):
    async with http.get(url(stack, FRONTEND_SERVICE, "/")) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    for try_url in try_urls(PUBLIC):
        assert f'href="{try_url}"' in page
    assert "grant_type=client_credentials" in page
    assert '<script src="/assets/app.js">' in page


async def test_frontend_serves_its_script_and_404s_a_missing_asset(stack, http):
    async with http.get(url(stack, FRONTEND_SERVICE, "/assets/app.js")) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/javascript"
        assert "EventSource" in await resp.text()
    async with http.get(url(stack, FRONTEND_SERVICE, "/assets/missing.js")) as resp:
        assert resp.status == 404


@pytest.mark.parametrize("path", ["/sandboxes/abc", "/settings/keys?tab=1", "/a/b/c/"])
async def test_frontend_answers_any_other_path_with_the_index(stack, http, path):
    async with http.get(url(stack, FRONTEND_SERVICE, "/")) as resp:
        index = await resp.text()
    async with http.get(url(stack, FRONTEND_SERVICE, path)) as resp:
        assert resp.status == 200
        assert await resp.text() == index


# --- the dev policy and its example for a cluster -------------------------------------------


def test_the_example_policy_is_the_dev_policy_for_a_public_origin():
    example = yaml.safe_load((REPO / "policies/examples/platform.yaml").read_text())
    assert example == mcp_security_policy("https://agents.example.com", "https://agents.example.com/oauth/jwks")


@pytest.mark.parametrize("policies", ["examples", "written"])
def test_the_policy_loads_on_the_shipped_routes_and_covers_only_the_mcp_rule(tmp_path, policies):
    if policies == "examples":
        directory = REPO / "policies/examples"
    else:
        directory = tmp_path
        write_policies(directory, PUBLIC, "http://127.0.0.1:9/oauth/jwks")
    config = load_routes(str(REPO / "routes.yaml"), LoadOptions())
    loaded = load_policies(str(directory), config)
    assert not config.errors and not loaded.errors and not loaded.problems, (config.errors, loaded.errors, loaded.problems)
    (policy,) = loaded.security
    mcp = next(r for r in config.routes if r.key == "platform/mcp")
    covered = {rule.name for rule in mcp.rules if loaded.security_for(mcp.key, rule.index, config.listeners[0].gateway)}
    assert covered == {"mcp"}  # /mcp/health and the metadata stay public
