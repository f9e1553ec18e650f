"""The dev stack's stand-ins, each hit directly with real clients on loopback (the Kubernetes
API stand-in with the gateway's own kubernetes-asyncio client and watch)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import time
from datetime import datetime, timezone
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
from gateway.config.model import PreviewZone
from gateway.config.schemas import validate
from gateway.devstack import (
    API_SERVICE,
    FRONTEND_SERVICE,
    MCP_SCOPE,
    MCP_SERVICE,
    start_devstack,
    try_commands,
    try_urls,
)
from gateway.devstack import api, cluster
from gateway.devstack.policy import mcp_security_policy, sandbox_policies, write_policies
from gateway.devstack.urls import SANDBOX_SCOPE, public_origin
from gateway.devstack.cluster import MERGE_PATCH
from gateway.devstack.cluster_store import ApiError, Store, TooOld, label_selector, merge_patch
from gateway.kube import HTTPROUTE, SANDBOX, SANDBOX_CLAIM, SERVICE, KubeClient, KubeError, WatchedKind
from gateway.policy.loader import load_policies
from gateway.preview import objects
from gateway.preview.objects import EXPIRES_AT, OWNER, SELECTOR
from gateway.preview.tokens import new_token
from gateway.sandbox.access import relation
from gateway.sandbox.registry import SandboxRegistry, sandbox_info
from gateway.sandbox.router import router_errors
from tests.support.policy_harness import wait_for

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
    addresses = [*stack.services.values(), stack.sandbox, (URL(stack.kube_api).host, URL(stack.kube_api).port)]
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


def test_try_commands_curl_every_url_then_get_a_token_and_use_it_on_mcp_the_sandbox_and_a_preview():
    commands = try_commands("https://agents.example.com/", 41234)
    assert len(commands) == len(try_urls("https://agents.example.com")) + 7
    *plain, get_token, use_token, get_sandbox_token, by_headers, by_port_proxy, create_preview, use_preview = commands
    assert all(c.startswith("curl -i ") for c in plain)
    assert plain[-1] == "curl -i https://agents.example.com/mcp"  # the 401 comes first
    assert get_token.startswith("TOKEN=$(curl -s -X POST -d grant_type=client_credentials ")
    assert "https://agents.example.com/oauth/token |" in get_token
    assert '-H "Authorization: Bearer $TOKEN"' in use_token
    assert use_token.endswith(" https://agents.example.com/mcp")
    # The MCP token opens no sandbox: the platform's token (scope sandboxes) does.
    assert get_sandbox_token.startswith(
        f"SANDBOX_TOKEN=$(curl -s -X POST -d grant_type=client_credentials -d scope={SANDBOX_SCOPE} ")
    assert "https://agents.example.com/oauth/token |" in get_sandbox_token
    for command in (by_headers, by_port_proxy, create_preview):
        assert '-H "Authorization: Bearer $SANDBOX_TOKEN"' in command and "$TOKEN" not in command
    assert "-H 'X-Sandbox-ID: demo' -H 'X-Sandbox-Port: 41234'" in by_headers
    assert by_headers.endswith(" https://agents.example.com/chat")
    assert by_port_proxy.endswith(" https://agents.example.com/gateway/v1/sandboxes/sandboxes/demo/ports/41234/chat")
    assert create_preview.startswith("PREVIEW=$(curl -s ")
    body = """'{"namespace":"sandboxes","sandbox":"demo","port":41234}'"""
    assert f"-d {body} https://agents.example.com/gateway/v1/previews |" in create_preview
    assert create_preview.endswith("""print(json.load(sys.stdin)["url"])')""")
    # The preview's host is never looked up: curl connects to the gateway's own address.
    assert "Authorization" not in use_preview
    assert use_preview.startswith("curl -i --connect-to ::agents.example.com:443 ")
    assert use_preview.endswith(' "${PREVIEW}chat"')


def test_the_preview_command_connects_to_the_listen_address_of_a_local_run():
    assert " --connect-to ::127.0.0.1:8080 " in try_commands("http://127.0.0.1:8080", 1)[-1]
    assert " --connect-to ::[::1]:8080 " in try_commands("http://[::1]:8080", 1)[-1]


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


async def test_a_sandboxes_token_is_for_the_platform_and_an_mcp_token_is_not(stack, http):
    status, _, body = await request_token(stack, http, {"grant_type": "client_credentials", "scope": SANDBOX_SCOPE})
    assert status == 200 and body["scope"] == SANDBOX_SCOPE, body
    claims = await verify(stack, http, body["access_token"], PUBLIC)  # the platform's own audience
    assert (claims["aud"], claims["scope"], claims["sub"]) == (PUBLIC, SANDBOX_SCOPE, "dev-user")
    _, _, mcp = await request_token(stack, http, {"grant_type": "client_credentials"})
    assert (await verify(stack, http, mcp["access_token"], PUBLIC + "/mcp"))["scope"] == MCP_SCOPE
    with pytest.raises(pyjwt.InvalidAudienceError):
        await verify(stack, http, mcp["access_token"], PUBLIC)


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
    assert f"/gateway/v1/sandboxes/sandboxes/demo/ports/{stack.sandbox[1]}/chat" in page
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


# --- the demo sandbox and the Kubernetes API stand-in that lists it --------------------------


def sandbox_url(stack, path: str) -> str:
    host, port = stack.sandbox
    return f"http://{host}:{port}{path}"


async def test_the_demo_sandbox_listens_on_its_pod_ip_and_chats(stack, http):
    assert stack.sandbox[0] == "127.0.0.1" == cluster.POD_IP
    async with http.post(sandbox_url(stack, "/chat"), json={"message": "hi"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"sandbox": "sandboxes/demo", "reply": "Sandbox sandboxes/demo heard: hi"}
    async with http.get(sandbox_url(stack, "/files?x=1"), headers={"X-Probe": "1"}) as resp:
        body = await resp.json()
    assert (body["sandbox"], body["method"], body["path"]) == ("sandboxes/demo", "GET", "/files?x=1")
    assert "X-Probe" in body["headers"]


async def test_the_demo_sandbox_echoes_over_a_websocket(stack, http):
    async with http.ws_connect(sandbox_url(stack, "/ws")) as ws:
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "sandboxes/demo: hello"


@pytest.fixture
async def kube(stack, tmp_path):
    """The gateway's own Kubernetes client, connected through the kubeconfig `sandgate dev` writes."""
    client = await KubeClient.connect(stack.write_kubeconfig(tmp_path / "kubeconfig"))
    yield client
    await client.close()


def test_the_demo_objects_are_valid_agent_sandbox_objects():
    (claim_type, claim), (sandbox_type, sandbox) = cluster.demo_objects("dev-user")
    assert (claim_type, sandbox_type) == (cluster.CLAIMS, cluster.SANDBOXES)
    for obj in (claim, sandbox):
        assert validate(obj) == [], (obj["kind"], validate(obj))
    (owner_ref,) = sandbox["metadata"]["ownerReferences"]
    assert (owner_ref["kind"], owner_ref["uid"]) == ("SandboxClaim", claim["metadata"]["uid"])
    assert sandbox["status"]["selector"] == f"agents.x-k8s.io/sandbox-name-hash={cluster.name_hash('demo')}"


@pytest.mark.parametrize(("name", "digest"), [("", "811c9dc5"), ("a", "e40c292c"), ("foobar", "bf9cf968")])
def test_name_hash_is_fnv_1a_32_as_agent_sandbox_labels_pods(name, digest):
    assert cluster.name_hash(name) == digest


async def test_the_kube_stand_in_lists_the_demo_sandbox_and_its_claim(kube):
    sandboxes = await kube.list(SANDBOX, "sandboxes")
    claims = await kube.list(SANDBOX_CLAIM, "sandboxes")
    assert [o["metadata"]["name"] for o in sandboxes["items"]] == ["demo"]
    assert [o["metadata"]["name"] for o in claims["items"]] == ["demo"]
    assert sandboxes["metadata"]["resourceVersion"] == claims["metadata"]["resourceVersion"] == "2"
    assert claims["items"][0]["metadata"]["annotations"] == {"sandgate.dev/owner": api.SUBJECT}
    assert (await kube.list(SANDBOX, "elsewhere"))["items"] == []


async def test_the_kube_stand_in_refuses_a_wrong_token(stack, tmp_path):
    path = cluster.write_kubeconfig(tmp_path / "kubeconfig", stack.kube_api, "not-the-token")
    client = await KubeClient.connect(str(path))
    try:
        with pytest.raises(KubeError) as refused:
            await client.list(SANDBOX, "sandboxes")
    finally:
        await client.close()
    assert (refused.value.status, refused.value.reason) == (401, "Unauthorized")


async def test_what_the_gateway_derives_from_the_stand_in(kube):
    registry = SandboxRegistry(kube)
    registry.watch_namespaces({"sandboxes"})
    try:
        assert await registry.wait_synced(5)
        info = registry.find("sandboxes", "demo")
        assert (info.ready, info.pod_ips, info.service_fqdn) == (True, ("127.0.0.1",), None)
        assert info.pod_selector == (("agents.x-k8s.io/sandbox-name-hash", cluster.name_hash("demo")),)  # for previews
        config = load_routes(str(REPO / "routes.yaml"), LoadOptions())
        (policy,) = load_policies(str(REPO / "policies"), config).sandbox
        assert relation(info, {"sub": api.SUBJECT}, policy) == "owner"
        assert relation(info, {"sub": "someone-else"}, policy) is None
        assert relation(info, {"sub": "someone-else", "groups": ["platform-admins"]}, policy) == "admin"
        assert registry.connected() and registry.find("sandboxes", "other") is None
    finally:
        await registry.stop()


async def test_the_gateways_watch_lists_then_stays_open_on_the_stand_in(kube):
    events = []
    watch = WatchedKind(kube, SANDBOX, "sandboxes", lambda kind, obj: events.append((kind, obj["metadata"]["name"])))
    watch.start()
    try:
        await asyncio.wait_for(watch.synced.wait(), 5)
        await asyncio.sleep(0.3)  # the watch from the list's resourceVersion is open by now
        assert events == [("ADDED", "demo")] and watch.relists == 1 and watch.connected
        assert not watch._task.done()  # a malformed answer would have ended the watch loop
    finally:
        await watch.stop()


async def test_a_watch_replays_what_came_after_its_resource_version_and_ends_at_its_timeout(stack, http):
    watch = f"{stack.kube_api}/apis/agents.x-k8s.io/v1beta1/namespaces/sandboxes/sandboxes"
    headers = {"Authorization": f"Bearer {stack.kube_token}"}

    async def replayed(since: str | None) -> list[tuple[str, str]]:
        params = {"watch": "True", "timeoutSeconds": "1", **({"resourceVersion": since} if since else {})}
        async with http.get(watch, params=params, headers=headers) as resp:
            assert resp.status == 200
            lines = (await resp.read()).splitlines()
        return [(e["type"], e["object"]["metadata"]["name"]) for e in map(json.loads, lines)]

    started = time.monotonic()
    got = await asyncio.gather(*(replayed(since) for since in (None, "0", "1", "2", "3")))
    assert 1 <= time.monotonic() - started < 3  # held open until timeoutSeconds, not longer
    assert got == [[("ADDED", "demo")]] * 3 + [[], []]
    async with http.get(watch, params={"watch": "true", "resourceVersion": "x"}, headers=headers) as resp:
        assert resp.status == 400


async def test_the_kube_stand_in_has_no_pod_exec(stack, http):
    exec_url = f"{stack.kube_api}/api/v1/namespaces/sandboxes/pods/demo/exec?command=sh"
    async with http.get(exec_url, headers={"Authorization": f"Bearer {stack.kube_token}"}) as resp:
        assert resp.status == 404


# --- what previews write to the Kubernetes API stand-in ------------------------------------


def preview_objects(sandbox: dict, port: int = 8080) -> tuple[dict, dict]:
    """The Service and HTTPRoute the gateway creates for a preview of `sandbox` in the shipped zone."""
    config = load_routes(str(REPO / "routes.yaml"), LoadOptions())
    (zone,) = config.served(PreviewZone).values()
    preview = objects.new_preview(new_token(), "sandboxes", "demo", sandbox["metadata"]["uid"], port, api.SUBJECT, zone,
                                  datetime.now(timezone.utc))
    selector = dict(sandbox_info(sandbox, None).pod_selector)
    return objects.service(preview, selector), objects.httproute(preview, zone)


def name_of(obj: dict) -> str:
    return obj["metadata"]["name"]


def version_of(obj: dict) -> int:
    return int(obj["metadata"]["resourceVersion"])


async def test_the_kube_stand_in_creates_lists_patches_and_deletes_a_previews_objects(kube):
    service, route = preview_objects(await kube.get(SANDBOX, "sandboxes", "demo"))
    name = name_of(route)
    made_service = await kube.create(SERVICE, "sandboxes", service)
    made_route = await kube.create(HTTPROUTE, "sandboxes", route)
    assert version_of(made_route) > version_of(made_service) > 2  # one counter for every object
    assert made_route["metadata"]["uid"] != made_service["metadata"]["uid"]
    assert made_service["spec"] == service["spec"] and made_route["spec"] == route["spec"]
    assert await kube.get(HTTPROUTE, "sandboxes", name) == made_route
    with pytest.raises(KubeError) as again:
        await kube.create(SERVICE, "sandboxes", service)
    assert (again.value.status, again.value.reason) == (409, "AlreadyExists")

    listed = await kube.list(HTTPROUTE, "sandboxes", "sandgate.dev/preview=true")
    assert [name_of(o) for o in listed["items"]] == [name] and version_of(listed) == version_of(made_route)
    services = await kube.list(SERVICE, "sandboxes", "sandgate.dev/sandbox==demo")
    assert [name_of(o) for o in services["items"]] == [name]
    for selector in ("sandgate.dev/preview!=true", "!sandgate.dev/sandbox", "sandgate.dev/sandbox=other", "nope"):
        assert (await kube.list(HTTPROUTE, "sandboxes", selector))["items"] == [], selector
    assert (await kube.list(SANDBOX, "sandboxes", "sandgate.dev/preview=true"))["items"] == []

    expires = {"metadata": {"annotations": {EXPIRES_AT: "2030-01-01T00:00:00.000Z"}}}
    patched = await kube.merge_patch(HTTPROUTE, "sandboxes", name, expires)
    annotations = patched["metadata"]["annotations"]
    assert annotations[EXPIRES_AT] == "2030-01-01T00:00:00.000Z" and annotations[OWNER] == api.SUBJECT  # merged
    assert version_of(patched) > version_of(made_route) and patched["metadata"]["uid"] == made_route["metadata"]["uid"]
    assert version_of(await kube.merge_patch(HTTPROUTE, "sandboxes", name, expires)) == version_of(patched)  # no-op

    assert not await kube.delete(HTTPROUTE, "sandboxes", name, uid="another-incarnation")  # 409: kept
    assert await kube.get(HTTPROUTE, "sandboxes", name) == patched
    assert await kube.delete(HTTPROUTE, "sandboxes", name, uid=patched["metadata"]["uid"])
    assert await kube.delete(SERVICE, "sandboxes", name)
    assert not await kube.delete(SERVICE, "sandboxes", name)  # 404: already gone
    assert await kube.get(HTTPROUTE, "sandboxes", name) is None
    with pytest.raises(KubeError) as missing:
        await kube.merge_patch(HTTPROUTE, "sandboxes", name, expires)
    assert missing.value.status == 404


async def test_a_watch_of_preview_routes_sees_them_come_change_and_go(kube):
    seen = []
    watch = WatchedKind(kube, HTTPROUTE, "sandboxes", lambda kind, obj: seen.append((kind, name_of(obj))),
                        label_selector=SELECTOR)
    watch.start()
    try:
        await asyncio.wait_for(watch.synced.wait(), 5)
        service, route = preview_objects(await kube.get(SANDBOX, "sandboxes", "demo"))
        name = name_of(route)
        await kube.create(SERVICE, "sandboxes", service)  # another kind: not in this watch
        plain = {**route, "metadata": {"name": "plain", "namespace": "sandboxes"}}
        await kube.create(HTTPROUTE, "sandboxes", plain)  # no preview label: not in this watch
        made = await kube.create(HTTPROUTE, "sandboxes", route)
        expires = {"metadata": {"annotations": {EXPIRES_AT: "2030-01-01T00:00:00.000Z"}}}
        await kube.merge_patch(HTTPROUTE, "sandboxes", name, expires)
        preview_label = {"metadata": {"labels": {"sandgate.dev/preview": "true"}}}
        await kube.merge_patch(HTTPROUTE, "sandboxes", "plain", preview_label)
        await kube.merge_patch(HTTPROUTE, "sandboxes", "plain", {"metadata": {"labels": None}})
        await kube.delete(HTTPROUTE, "sandboxes", name, uid=made["metadata"]["uid"])

        async def all_seen() -> bool:
            return len(seen) >= 5

        assert await wait_for(all_seen)
        await asyncio.sleep(0.1)
    finally:
        await watch.stop()
    # A route that starts matching the selector is ADDED to this watch, one that stops DELETED.
    assert seen == [("ADDED", name), ("MODIFIED", name), ("ADDED", "plain"), ("DELETED", "plain"), ("DELETED", name)]
    assert watch.objects == {} and watch.relists == 1


async def test_the_kube_stand_in_refuses_what_a_real_server_would(stack, kube, http):
    headers = {"Authorization": f"Bearer {stack.kube_token}"}
    service, route = preview_objects(await kube.get(SANDBOX, "sandboxes", "demo"))

    async def status(method: str, path: str, body=None, content_type: str = "application/json") -> tuple[int, str]:
        data = json.dumps(body) if body is not None else None
        async with http.request(method, stack.kube_api + path, data=data,
                                headers={**headers, "Content-Type": content_type}) as resp:
            return resp.status, (await resp.json())["reason"]

    core, gateway_api = "/api/v1/namespaces", "/apis/gateway.networking.k8s.io/v1/namespaces"
    sandboxes = "/apis/agents.x-k8s.io/v1beta1/namespaces/sandboxes/sandboxes"
    assert await status("POST", sandboxes, {"metadata": {"name": "x"}}) == (405, "MethodNotAllowed")  # the demo's
    assert await status("DELETE", sandboxes + "/demo") == (405, "MethodNotAllowed")
    assert await status("POST", f"{core}/elsewhere/services", service) == (404, "NotFound")  # no such namespace
    assert await status("POST", f"{core}/sandboxes/services", {**service, "kind": "Pod"}) == (400, "BadRequest")
    assert await status("POST", f"{core}/sandboxes/services", {**service, "spec": {}}) == (422, "Invalid")
    bad_route = {**route, "spec": {**route["spec"], "hostnames": ["*.*.example.com"]}}
    assert await status("POST", f"{gateway_api}/sandboxes/httproutes", bad_route) == (422, "Invalid")
    assert await status("GET", f"{gateway_api}/sandboxes/httproutes?labelSelector=a+in+(b)") == (400, "BadRequest")
    await kube.create(HTTPROUTE, "sandboxes", route)
    one = f"{gateway_api}/sandboxes/httproutes/{name_of(route)}"
    assert await status("PATCH", one, [{"op": "remove", "path": "/spec"}], "application/json-patch+json") == (
        415, "UnsupportedMediaType")
    assert await status("PATCH", one, {"metadata": {"resourceVersion": "1"}}, MERGE_PATCH) == (409, "Conflict")
    assert await status("PATCH", one, {"spec": {"rules": "none"}}, MERGE_PATCH) == (422, "Invalid")
    assert await status("DELETE", one, {"preconditions": {"resourceVersion": "1"}}) == (409, "Conflict")


def test_a_watch_from_a_version_no_longer_kept_is_too_old():
    store = Store(history=2)
    for n in range(3):
        store.put(cluster.SERVICES, {"metadata": {"name": f"s{n}", "namespace": "sandboxes"}})
    assert [e.revision for e in store.events_after(1)] == [2, 3]
    with pytest.raises(TooOld):
        store.events_after(0)


async def test_a_watch_from_an_expired_version_ends_with_a_410_event(aiohttp_server, http):
    app = cluster.make_app(api.SUBJECT, "t")
    app[cluster.STORE] = store = Store(history=1)
    for n in range(3):  # the history keeps the last change only (revision 3)
        store.put(cluster.HTTPROUTES, {"metadata": {"name": f"r{n}", "namespace": "sandboxes"}})
    server = await aiohttp_server(app, host="127.0.0.1")
    path = "/apis/gateway.networking.k8s.io/v1/namespaces/sandboxes/httproutes"
    params = {"watch": "true", "resourceVersion": "1", "timeoutSeconds": "1"}
    async with http.get(server.make_url(path), params=params, headers={"Authorization": "Bearer t"}) as resp:
        (line,) = (await resp.read()).splitlines()
    event = json.loads(line)
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")


@pytest.mark.parametrize(("selector", "labels", "matches"), [
    ("", {}, True),
    ("a=b", {"a": "b"}, True),
    ("a==b", {"a": "c"}, False),
    ("a!=b", {}, True),
    ("a", {"a": ""}, True),
    ("!a", {"a": "x"}, False),
    ("sandgate.dev/preview=true, sandgate.dev/sandbox", {"sandgate.dev/preview": "true", "sandgate.dev/sandbox": ""},
     True),
    ("sandgate.dev/preview=true,sandgate.dev/sandbox", {"sandgate.dev/preview": "true"}, False),
])
def test_label_selectors(selector, labels, matches):
    assert label_selector(selector)(labels) is matches


@pytest.mark.parametrize("selector", ["a in (b)", "a notin (b)", "!a=b", "=b", "a=b c"])
def test_set_based_and_malformed_selectors_are_refused(selector):
    with pytest.raises(ApiError) as refused:
        label_selector(selector)
    assert refused.value.code == 400


def test_merge_patch_is_rfc_7386():
    target = {"a": "b", "c": {"d": "e", "f": "g"}}
    assert merge_patch(target, {"a": "z", "c": {"f": None}}) == {"a": "z", "c": {"d": "e"}}
    assert merge_patch(target, {"c": ["x"]}) == {"a": "b", "c": ["x"]}
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}}  # untouched


# --- the dev policy and its example for a cluster -------------------------------------------


def test_the_example_policy_is_the_dev_policy_for_a_public_origin():
    example = yaml.safe_load((REPO / "policies/examples/platform.yaml").read_text())
    assert example == mcp_security_policy("https://agents.example.com", "https://agents.example.com/oauth/jwks")


def test_the_shipped_sandbox_policies_are_the_dev_ones_for_a_public_origin():
    shipped = list(yaml.safe_load_all((REPO / "policies/sandboxes.yaml").read_text()))
    in_cluster_jwks = "http://api.platform.svc.cluster.local:8000/oauth/jwks"
    assert shipped == sandbox_policies("https://agents.example.com", in_cluster_jwks)


def covered_rules(loaded, config, route_key: str) -> set[str]:
    route = next(r for r in config.routes if r.key == route_key)
    gateway = config.listeners[0].gateway
    return {rule.name for rule in route.rules if loaded.security_for(route.key, rule.index, gateway)}


@pytest.mark.parametrize("policies", ["shipped", "written"])
def test_the_policies_load_on_the_shipped_routes_and_cover_the_mcp_rule_and_the_sandboxes(tmp_path, policies):
    directory = tmp_path
    if policies == "shipped":
        for path in [REPO / "policies/sandboxes.yaml", REPO / "policies/examples/platform.yaml"]:
            (directory / path.name).write_text(path.read_text())
    else:
        write_policies(directory, PUBLIC, "http://127.0.0.1:9/oauth/jwks")
    config = load_routes(str(REPO / "routes.yaml"), LoadOptions())
    loaded = load_policies(str(directory), config)
    assert not config.errors and not loaded.errors and not loaded.problems, (config.errors, loaded.errors, loaded.problems)
    assert sorted(p.name for p in loaded.security) == ["mcp", "sandboxes"]
    assert covered_rules(loaded, config, "platform/mcp") == {"mcp"}  # /mcp/health and the metadata stay public
    assert covered_rules(loaded, config, "platform/sandboxes") == {"header-routed", "sandbox-api"}
    assert covered_rules(loaded, config, "platform/previews") == {"preview-api"}
    assert covered_rules(loaded, config, "platform/preview-hosts") == set()  # the host is the capability
    assert covered_rules(loaded, config, "platform/frontend") == set()
    (sandbox_policy,) = loaded.sandbox
    assert sandbox_policy.owner_annotation == "sandgate.dev/owner"
    assert sandbox_policy.admin_groups == ("platform-admins",)
    gateway = config.listeners[0].gateway
    for route in ("platform/sandboxes", "platform/previews", "platform/preview-hosts"):
        assert loaded.sandbox_attached.for_rule(route, 0, gateway) is sandbox_policy, route
    assert router_errors(config, lambda *target: loaded.security_for(*target) is not None) == []


def test_the_shipped_policies_directory_holds_only_the_sandbox_policies():
    """policies/ is loaded as shipped (Dockerfile, `serve` in a checkout); examples/ is not."""
    config = load_routes(str(REPO / "routes.yaml"), LoadOptions())
    loaded = load_policies(str(REPO / "policies"), config)
    assert not loaded.errors and not loaded.problems
    assert [p.name for p in loaded.security] == ["sandboxes"] and len(loaded.sandbox) == 1
