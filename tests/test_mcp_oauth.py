"""An MCP route as an OAuth protected resource (SPEC §3.3, §3.4, RFC 6750, RFC 9728), end to end:
the official `mcp` SDK client → Sandgate → the SDK's MCP server (tests/support/mcp_upstream.py).

The route `/mcp` is annotated `sandgate.dev/mcp: "true"` and protected by a JWT SecurityPolicy
whose provider is a real JWKS issuer on loopback (tests/support/issuer.py) and whose only Allow
rule needs scope `mcp:tools`. The gateway's --public-url is its real loopback origin, so every
URL it advertises can be dialled (no DNS names); the issuer identifier is the issuer's own
loopback origin, so the SDK's OAuth discovery never leaves the machine either.

The provider also accepts audience `api`: a token for `api` passes the provider's own audience
check, so only the MCP rule (audience = the public MCP URL) can refuse it.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from time import monotonic
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from gateway.server.handler import Settings
from tests.support.fixtures import issuer, recording_mcp  # noqa: F401 (fixtures)
from tests.support.harness import free_port, mcp_routes, running_gateway
from tests.support.issuer import Issuer, claims
from tests.support.mcp_upstream import RecordingASGI, RecordingTransport
from tests.support.policy_harness import challenge_params, route_target, security_policy, wait_ready

MODES = ["legacy", "auto"]  # the session era and the stateless era of streamable HTTP
SCOPE = "mcp:tools"
LIVE = 0.5  # max upstream→client lag of one SSE event that still counts as "relayed at once"


class Env:
    """The running pieces and the URLs the gateway must advertise."""

    def __init__(self, gw, issuer: Issuer, upstream: RecordingASGI, public: str):
        self.gw, self.issuer, self.upstream = gw, issuer, upstream
        self.public = public
        self.mcp_url = public + "/mcp"
        self.metadata_url = public + "/.well-known/oauth-protected-resource/mcp"
        self.iss = f"http://127.0.0.1:{issuer.port}"

    def token(self, **overrides) -> str:
        return self.issuer.mint(claims(**{"iss": self.iss, "aud": self.mcp_url, "scope": SCOPE, **overrides}))


@pytest.fixture
async def env(tmp_path, issuer, upstream):
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    iss = f"http://127.0.0.1:{issuer.port}"
    spec = {
        "jwt": {"providers": [{"name": "idp", "issuer": iss, "audiences": [public + "/mcp", "api"],
                               "remoteJWKS": {"uri": issuer.jwks_uri}}]},
        "authorization": {"rules": [{"action": "Allow", "principal": {"jwt": {"provider": "idp", "scopes": [SCOPE]}}}]},
    }
    policy = security_policy("mcp", spec, targets=[route_target("mcp")])
    async with running_gateway(tmp_path, mcp_routes(upstream.port), policies_yaml=policy, listen=[f"127.0.0.1:{port}"],
                               settings=Settings(public_url=public)) as gw:
        assert await wait_ready(gw)
        yield Env(gw, issuer, upstream, public)


@asynccontextmanager
async def connect(url: str, mode: str, headers: dict | None = None, auth=None, wire=None, **client_options):
    """The SDK client on `url`; yields (client, wire), wire recording every exchange."""
    wire = wire or RecordingTransport()
    async with httpx2.AsyncClient(transport=wire, headers=headers or {}, auth=auth,
                                  timeout=httpx2.Timeout(10, read=60)) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode, **client_options) as client:
            yield client, wire


async def refused(url: str, mode: str, headers: dict | None = None) -> list:
    """Connect with the SDK client, which must fail; returns the recorded exchanges."""
    wire_out: list = []
    with pytest.raises(BaseException) as failure:  # noqa: PT011 - the SDK's error type is not the point
        async with asyncio.timeout(15):
            wire = RecordingTransport()
            wire_out.append(wire)
            async with httpx2.AsyncClient(transport=wire, headers=headers or {}, timeout=10) as http:
                async with Client(streamable_http_client(url, http_client=http), mode=mode):
                    pass
    assert not isinstance(failure.value, TimeoutError), "the client hung instead of failing"
    exchanges = wire_out[0].exchanges
    assert exchanges, "the client sent nothing"
    return exchanges


def body_json(exchange) -> dict:
    assert exchange.content_type == "application/json", exchange.response_headers
    return json.loads(exchange.body)


def only_status(exchanges, status: int):
    """Every exchange of a refused connection got `status`; returns the first."""
    assert [e.status for e in exchanges] == [status] * len(exchanges), [(e.method, e.status) for e in exchanges]
    return exchanges[0]


# --- 1. no token: 401 with the RFC 9728 pointer, the metadata, and the SDK's discovery ---------


@pytest.mark.parametrize("mode", MODES)
async def test_without_a_token_initialize_gets_401_pointing_at_the_metadata(env, mode):
    exchanges = await refused(env.mcp_url, mode)
    first = only_status(exchanges, 401)
    assert first.method == "POST" and first.path == "/mcp"
    (challenge,) = first.response_header("www-authenticate")
    assert challenge.startswith('Bearer realm="'), challenge
    params = challenge_params(challenge)
    assert params == {"realm": params["realm"], "resource_metadata": env.metadata_url}, params
    assert params["realm"]
    body = body_json(first)
    assert body["error"] == "unauthorized" and body["request_id"]
    assert body["violations"][0]["code"] == "credentials-missing"
    assert env.upstream.exchanges == [], "an unauthenticated request reached the upstream"


async def test_protected_resource_metadata_through_the_gateway(env):
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.get(env.metadata_url)
        root = await http.get(env.public + "/.well-known/oauth-protected-resource")
        # The document names the public URL, not whatever Host the request carried.
        other_host = await http.get(env.metadata_url, headers={"Host": "127.0.0.1:9"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["resource"] == env.mcp_url
    assert document["authorization_servers"] == [env.iss]
    assert document["bearer_methods_supported"] == ["header"]
    assert document["scopes_supported"] == [SCOPE]
    assert root.status_code == 200 and root.json() == document
    assert other_host.status_code == 200 and other_host.json()["resource"] == env.mcp_url
    assert env.upstream.exchanges == [], "the gateway must answer the metadata itself"


class _Storage:
    """A pre-registered client and no tokens: the SDK flow goes 401 → discovery → authorize."""

    def __init__(self, client_info: OAuthClientInformationFull):
        self.client_info = client_info
        self.tokens: OAuthToken | None = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client_info

    async def set_client_info(self, client_info):
        self.client_info = client_info


class _StopAtAuthorization(Exception):
    pass


async def test_sdk_oauth_client_discovers_the_protected_resource_from_the_401(env):
    redirect = "http://127.0.0.1:1/callback"
    authorize_urls: list[str] = []

    async def redirect_handler(authorization_url: str) -> None:
        authorize_urls.append(authorization_url)
        raise _StopAtAuthorization  # no authorization server needed: discovery is what is tested

    async def callback_handler():
        raise AssertionError("unreachable")

    provider = OAuthClientProvider(
        server_url=env.mcp_url,
        client_metadata=OAuthClientMetadata(redirect_uris=[redirect], token_endpoint_auth_method="none"),
        storage=_Storage(OAuthClientInformationFull(client_id="test-client", redirect_uris=[redirect],
                                                    token_endpoint_auth_method="none")),
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )
    wire = RecordingTransport()
    with pytest.raises(BaseException) as failure:  # noqa: PT011
        async with asyncio.timeout(15):
            async with connect(env.mcp_url, "legacy", auth=provider, wire=wire):
                pass
    assert not isinstance(failure.value, TimeoutError), "the client hung instead of failing"
    assert authorize_urls, "the SDK's OAuth flow never reached the authorization step"

    requests = [(e.method, e.path, e.status) for e in wire.exchanges]
    assert requests[0] == ("POST", "/mcp", 401), requests
    # Discovery used the challenge's resource_metadata first and found it there.
    assert requests[1] == ("GET", "/.well-known/oauth-protected-resource/mcp", 200), requests
    assert wire.exchanges[1].request_header("host") == [env.public.split("//")[1]]
    prm = provider.context.protected_resource_metadata
    assert prm is not None
    assert str(prm.resource) == env.mcp_url
    assert [str(u).rstrip("/") for u in prm.authorization_servers] == [env.iss]
    assert prm.bearer_methods_supported == ["header"]
    assert str(provider.context.auth_server_url).rstrip("/") == env.iss
    # The SDK then asks the authorization server (the issuer) for its metadata: off the gateway.
    assert any(e.path.startswith("/.well-known/oauth-authorization-server") for e in wire.exchanges[2:]), requests
    # What it would ask the authorization server for: a token for this resource with our scope.
    query = parse_qs(urlsplit(authorize_urls[0]).query)
    assert query["resource"] == [env.mcp_url]
    assert query["scope"] == [SCOPE]
    assert env.upstream.exchanges == []


# --- 2. a valid token: everything works, progress is live, the token reaches the upstream ------


@pytest.mark.parametrize("mode", MODES)
async def test_valid_token_tools_progress_and_authorization_forwarded(env, mode):
    token = env.token()
    n, delay = 3, 0.4
    progress: list[tuple[float, float]] = []

    async def on_progress(value, total, message):
        progress.append((monotonic(), value))

    async with connect(env.mcp_url, mode, headers={"Authorization": f"Bearer {token}"}) as (client, wire):
        if mode == "legacy":
            assert client.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
            assert wire.exchanges[0].status == 200 and wire.exchanges[0].response_header("mcp-session-id")
        else:
            assert client.protocol_version in MODERN_PROTOCOL_VERSIONS
        assert client.server_info.name == "sandgate-dev-mcp"
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert {"echo", "slow_count", "request_headers"} <= tools
        echoed = await client.call_tool("echo", {"text": "héllo"})
        assert not echoed.is_error and echoed.content[0].text == "héllo"
        seen = dict((await client.call_tool("request_headers", {})).structured_content["result"])
        assert seen.get("authorization") == f"Bearer {token}", "the upstream did not get the Authorization header"

        started = monotonic()
        result = await client.call_tool("slow_count", {"n": n, "delay": delay}, progress_callback=on_progress)
        done = monotonic()
    assert result.content[0].text == f"counted to {n}"
    assert [v for _, v in progress] == list(range(1, n + 1))
    assert progress[0][0] - started < LIVE, f"first progress after {progress[0][0] - started:.2f}s"
    assert done - progress[0][0] >= (n - 1) * delay - 0.2, "progress arrived in a burst with the result"

    # Each progress event reached the client right after the upstream sent it.
    (call,) = [e for e in env.upstream.exchanges if b"counted to" in e.body]
    sent = [t for t, chunk in call.chunks if b"notifications/progress" in chunk]
    assert len(sent) == n
    lags = [arrival - s for (arrival, _), s in zip(progress, sent)]
    assert max(lags) < LIVE, [round(x, 3) for x in lags]

    # Every request the client sent went through the gateway with the token, unchanged.
    assert all(e.status is not None and e.status < 400 for e in wire.exchanges), [(e.method, e.status) for e in wire.exchanges]
    for exchange in wire.exchanges:
        assert env.upstream.paired(exchange).request_header("authorization") == [f"Bearer {token}"], exchange.method


# --- 3. wrong audience, missing scope, token in the query, foreign Origin ----------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("aud", ["api", "http://127.0.0.1:1/mcp"], ids=["provider-audience", "other-resource"])
async def test_token_for_another_audience_is_401_invalid_token(env, mode, aud):
    exchanges = await refused(env.mcp_url, mode, {"Authorization": f"Bearer {env.token(aud=aud)}"})
    first = only_status(exchanges, 401)
    params = challenge_params(first.response_header("www-authenticate")[0])
    assert params["error"] == "invalid_token", params
    assert params["resource_metadata"] == env.metadata_url
    assert body_json(first)["violations"][0]["code"] == "token-audience-mismatch"
    assert env.upstream.exchanges == []


@pytest.mark.parametrize("mode", MODES)
async def test_token_without_the_scope_is_403_insufficient_scope(env, mode):
    exchanges = await refused(env.mcp_url, mode, {"Authorization": f"Bearer {env.token(scope='profile mcp:read')}"})
    first = only_status(exchanges, 403)
    params = challenge_params(first.response_header("www-authenticate")[0])
    assert params["error"] == "insufficient_scope", params
    assert params["scope"] == SCOPE
    assert params["resource_metadata"] == env.metadata_url
    body = body_json(first)
    assert body["error"] == "policy_violation"
    assert body["violations"][0]["code"] == "insufficient-scope"
    assert env.upstream.exchanges == []


@pytest.mark.parametrize("with_header", [False, True], ids=["query-only", "query-and-header"])
async def test_access_token_in_the_query_is_refused(env, with_header):
    token = env.token()
    headers = {"Authorization": f"Bearer {token}"} if with_header else {}
    exchanges = await refused(f"{env.mcp_url}?access_token={token}", "legacy", headers)
    first = exchanges[0]
    assert first.status in (400, 401), first.status
    assert [e.status for e in exchanges] == [first.status] * len(exchanges)
    assert body_json(first)["violations"][0]["code"] == "token-in-query"
    assert env.upstream.exchanges == [], "a request with a token in its query reached the upstream"


@pytest.mark.parametrize("origin", ["https://evil.example", "http://127.0.0.1:1"], ids=["foreign-host", "other-port"])
async def test_foreign_origin_is_403_and_the_public_origin_works(env, origin):
    # http://127.0.0.1:1 is an Origin the upstream itself would accept: only the gateway can refuse it.
    token = env.token()
    exchanges = await refused(env.mcp_url, "legacy", {"Authorization": f"Bearer {token}", "Origin": origin})
    first = only_status(exchanges, 403)
    body = body_json(first)
    assert body["error"] == "policy_violation"
    assert body["violations"][0]["code"] == "origin-not-allowed"
    assert env.upstream.exchanges == []

    async with connect(env.mcp_url, "legacy", headers={"Authorization": f"Bearer {token}", "Origin": env.public}) as (client, wire):
        echoed = await client.call_tool("echo", {"text": "same origin"})
        assert echoed.content[0].text == "same origin"
        seen = dict((await client.call_tool("request_headers", {})).structured_content["result"])
        assert seen["origin"] == env.public
    assert all(e.status is not None and e.status < 400 for e in wire.exchanges)
