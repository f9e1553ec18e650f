"""`sandgate dev` end to end: the shipped routes.yaml, the stand-ins and the dev policies, set
up by the command's own `dev_environment`, with real clients on loopback.

The MCP route needs a JWT from the API stand-in's issuer: without one a client gets a 401 that
points at the RFC 9728 metadata; with one from `POST /oauth/token` (through the gateway) the
official `mcp` SDK client works; `/mcp/health` stays public; readiness waits for the JWKS.
The same token reaches the demo sandbox, found through the Kubernetes API stand-in, by
`X-Sandbox-*` headers and through the port proxy, and opens a preview of it whose host reaches it
without a token; nobody else's does.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import time
from pathlib import Path

import aiohttp
import httpx2
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from multidict import MultiDict
from yarl import URL

from gateway.commands.dev import dev_environment
from gateway.devstack import API_SERVICE, MCP_SCOPE, try_commands
from gateway.devstack.api import issue_token
from gateway.devstack.urls import SANDBOX_SCOPE
from gateway.kube import HTTPROUTE, SANDBOX, SERVICE, KubeClient
from gateway.server.app import start_gateway
from tests.support.policy_harness import assert_error_body, challenge_params, readiness, wait_for, wait_ready

ROUTES = str(Path(__file__).resolve().parents[1] / "routes.yaml")
MODES = ["legacy", "auto"]  # the session era and the stateless era of streamable HTTP


def _free_port() -> int:
    # The public URL (issuer, audience) names the listen port, so it must be known up front.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dev:
    """The dev environment (public_url, stack, options) and the gateway started from it."""

    def __init__(self, env, running):
        self.env, self.running = env, running

    def __getattr__(self, name):
        return getattr(self.env, name)


@pytest.fixture
async def dev(tmp_path):
    async with dev_environment(ROUTES, f"127.0.0.1:{_free_port()}", "127.0.0.1:0", data_dir=str(tmp_path)) as env:
        running = await start_gateway(env.options)  # what `serve` does first
        try:
            assert await wait_ready(running, timeout=30)  # a loaded CI machine lists slowly
            yield Dev(env, running)
        finally:
            await running.drain()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def get_token(dev, http, **form) -> str:
    """A token as an OAuth client finds one: metadata → issuer's metadata → token endpoint."""
    async with http.get(dev.public_url + "/.well-known/oauth-protected-resource/mcp") as resp:
        (issuer,) = (await resp.json())["authorization_servers"]
    async with http.get(issuer + "/.well-known/oauth-authorization-server") as resp:
        token_endpoint = (await resp.json())["token_endpoint"]
    assert token_endpoint == dev.public_url + "/oauth/token"  # through the gateway
    async with http.post(token_endpoint, data={"grant_type": "client_credentials", **form}) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["access_token"]


async def test_readiness_waits_for_the_issuers_keys_and_the_sandbox_state(dev):
    status, details = await readiness(dev.running)
    assert status == 200
    assert details["jwks_loaded"] is True
    assert details["kubernetes"] == "synced"


async def test_mcp_without_a_token_is_401_pointing_at_the_metadata(dev, http):
    async with http.post(dev.public_url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}) as resp:
        assert resp.status == 401
        challenge = challenge_params(resp.headers["WWW-Authenticate"])
        assert_error_body(await resp.json(), "unauthorized", "credentials-missing")
    assert challenge["resource_metadata"] == dev.public_url + "/.well-known/oauth-protected-resource/mcp"
    async with http.get(challenge["resource_metadata"]) as resp:
        assert resp.status == 200
        metadata = await resp.json()
    assert metadata == {
        "resource": dev.public_url + "/mcp",
        "authorization_servers": [dev.public_url],
        "bearer_methods_supported": ["header"],
        "scopes_supported": [MCP_SCOPE],
    }


@pytest.mark.parametrize("mode", MODES)
async def test_the_mcp_sdk_client_with_a_token_calls_a_tool_through_the_gateway(dev, http, mode):
    token = await get_token(dev, http)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=10) as http_client:
        async with Client(streamable_http_client(dev.public_url + "/mcp", http_client=http_client), mode=mode) as client:
            assert client.server_info.name == "sandgate-dev-mcp"
            result = await client.call_tool("add", {"a": 2, "b": 40})
    assert not result.is_error
    assert result.structured_content == {"result": 42}


async def test_a_token_without_the_scope_is_403_insufficient_scope(dev, http):
    token = await get_token(dev, http, scope="openid")
    async with http.post(dev.public_url + "/mcp", headers={"Authorization": f"Bearer {token}"}, json={}) as resp:
        assert resp.status == 403
        challenge = challenge_params(resp.headers["WWW-Authenticate"])
    assert challenge["error"] == "insufficient_scope"
    assert challenge["scope"] == MCP_SCOPE


async def test_a_token_for_another_resource_is_refused(dev, http):
    token = await get_token(dev, http, resource=dev.public_url + "/api")
    async with http.post(dev.public_url + "/mcp", headers={"Authorization": f"Bearer {token}"}, json={}) as resp:
        assert resp.status == 401
        assert challenge_params(resp.headers["WWW-Authenticate"])["error"] == "invalid_token"
        assert_error_body(await resp.json(), "unauthorized", "token-audience-mismatch")


async def test_mcp_health_and_the_rest_of_the_platform_stay_public(dev, http):
    async with http.get(dev.public_url + "/mcp/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    async with http.get(dev.public_url + "/api/hello") as resp:
        assert resp.status == 200
        assert (await resp.json())["service"] == "api"


async def test_the_gateway_fetches_keys_from_the_stand_in_directly(dev):
    host, port = dev.stack.services[API_SERVICE]
    written = Path(dev.options.policies, "mcp.yaml").read_text()
    assert f"uri: http://{host}:{port}/oauth/jwks" in written


async def test_the_policies_and_the_kubeconfig_are_removed_on_exit(tmp_path):
    async with dev_environment(ROUTES, f"127.0.0.1:{_free_port()}", None, data_dir=str(tmp_path)) as env:
        policies, kubeconfig = env.options.policies, env.options.kubeconfig
        assert sorted(os.listdir(policies)) == ["mcp.yaml", "sandboxes.yaml"]
        assert os.stat(kubeconfig).st_mode & 0o077 == 0  # it holds the stand-in's token
        assert env.options.settings.allow_loopback_sandboxes  # the demo sandbox's pod IP is 127.0.0.1
    assert not os.path.exists(policies) and not os.path.exists(kubeconfig)


# --- the demo sandbox ---------------------------------------------------------------------------


def sandbox_headers(dev, token: str | None, **extra: str) -> dict:
    headers = {"X-Sandbox-ID": "demo", "X-Sandbox-Port": str(dev.stack.sandbox[1]), **extra}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def port_proxy(dev, path: str = "/chat") -> str:
    return f"{dev.public_url}/gateway/v1/sandboxes/sandboxes/demo/ports/{dev.stack.sandbox[1]}{path}"


def token_for(dev, subject: str) -> str:
    """A platform token of the dev issuer (scope sandboxes), exactly as POST /oauth/token makes
    it, for another subject."""
    form = MultiDict(grant_type="client_credentials", scope=SANDBOX_SCOPE)
    return issue_token(form, dev.public_url, dev.stack.signing_key, subject=subject)["access_token"]


async def sandbox_token(dev, http) -> str:
    """The platform's token for the demo sandbox's owner: what the tour's SANDBOX_TOKEN is."""
    return await get_token(dev, http, scope=SANDBOX_SCOPE)


async def test_an_mcp_clients_token_opens_no_sandbox_terminal_port_or_preview(dev, http):
    """The dev issuer's default token is an MCP client's (audience the MCP URL, scope
    mcp:tools): the owner's own subject, yet refused everywhere sandboxes are reached."""
    mcp = await get_token(dev, http)
    bearer = {"Authorization": f"Bearer {mcp}"}
    async with http.post(dev.public_url + "/chat", json={}, headers=sandbox_headers(dev, mcp)) as resp:
        assert resp.status == 401
        assert_error_body(await resp.json(), "unauthorized", "token-audience-mismatch")
    async with http.post(port_proxy(dev), json={}, headers=bearer) as resp:
        assert resp.status == 401
        assert_error_body(await resp.json(), "unauthorized", "token-audience-mismatch")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with http.ws_connect(port_proxy(dev, "/ws"), headers=bearer):
            pass
    assert refused.value.status == 401
    terminal = f"{dev.public_url}/gateway/v1/sandboxes/sandboxes/demo/terminal"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with http.ws_connect(terminal, headers=bearer):
            pass
    assert refused.value.status == 401
    status, body = await create_preview(dev, http, mcp)
    assert status == 401 and body["violations"][0]["code"] == "token-audience-mismatch", body


async def test_a_platform_token_without_the_sandboxes_scope_is_403(dev, http):
    token = await get_token(dev, http, scope="openid", resource=dev.public_url)
    async with http.post(dev.public_url + "/chat", json={}, headers=sandbox_headers(dev, token)) as resp:
        assert resp.status == 403
        assert_error_body(await resp.json(), "policy_violation", "insufficient-scope")
    status, body = await create_preview(dev, http, token)
    assert status == 403 and body["violations"][0]["code"] == "insufficient-scope", body
    # and an MCP token for the platform's audience is no better: the scope is what counts
    token = await get_token(dev, http, scope=MCP_SCOPE, resource=dev.public_url)
    async with http.post(port_proxy(dev), json={}, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 403


async def test_the_dev_token_reaches_the_demo_sandbox_by_headers(dev, http):
    token = await sandbox_token(dev, http)
    async with http.post(dev.public_url + "/chat", json={"message": "hi"}, headers=sandbox_headers(dev, token)) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"sandbox": "sandboxes/demo", "reply": "Sandbox sandboxes/demo heard: hi"}
    async with http.get(dev.public_url + "/whoami?x=1", headers=sandbox_headers(dev, token)) as resp:
        seen = await resp.json()
    assert (seen["sandbox"], seen["path"]) == ("sandboxes/demo", "/whoami?x=1")
    sent = {name.lower() for name in seen["headers"]}
    assert "authorization" not in sent and not any(name.startswith("x-sandbox-") for name in sent), sent


async def test_the_dev_token_reaches_the_demo_sandbox_through_the_port_proxy(dev, http):
    token = await sandbox_token(dev, http)
    bearer = {"Authorization": f"Bearer {token}"}
    async with http.post(port_proxy(dev), json={"message": "hi"}, headers=bearer) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["reply"] == "Sandbox sandboxes/demo heard: hi"
    async with http.ws_connect(port_proxy(dev, "/ws"), headers=bearer) as ws:
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "sandboxes/demo: hello"


async def test_without_a_token_the_sandbox_is_401(dev, http):
    async with http.post(dev.public_url + "/chat", json={}, headers=sandbox_headers(dev, None)) as resp:
        assert resp.status == 401
        assert_error_body(await resp.json(), "unauthorized", "credentials-missing")
    async with http.post(port_proxy(dev), json={}) as resp:
        assert resp.status == 401


async def test_a_token_from_another_issuer_is_401(dev, http):
    stranger = pyjwt.encode(
        {"iss": dev.public_url, "sub": "dev-user", "exp": int(time.time()) + 60},
        rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256", headers={"kid": "dev-1"},
    )
    async with http.post(dev.public_url + "/chat", json={}, headers=sandbox_headers(dev, stranger)) as resp:
        assert resp.status == 401


async def test_someone_elses_token_finds_no_sandbox(dev, http):
    stranger = token_for(dev, "someone-else")
    async with http.post(dev.public_url + "/chat", json={}, headers=sandbox_headers(dev, stranger)) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "sandbox_not_found"
    async with http.post(port_proxy(dev), json={}, headers={"Authorization": f"Bearer {stranger}"}) as resp:
        assert resp.status == 404
    # ... exactly as for a sandbox that does not exist, so names cannot be probed
    owner = await sandbox_token(dev, http)
    missing = sandbox_headers(dev, owner, **{"X-Sandbox-ID": "nope"})
    async with http.post(dev.public_url + "/chat", json={}, headers=missing) as resp:
        assert resp.status == 404


async def test_the_terminal_answers_an_error_in_dev(dev, http):
    """The Kubernetes API stand-in has no pod exec (README, `sandgate dev`)."""
    token = await sandbox_token(dev, http)
    terminal = f"{dev.public_url}/gateway/v1/sandboxes/sandboxes/demo/terminal"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with http.ws_connect(terminal, headers={"Authorization": f"Bearer {token}"}):
            pass
    assert refused.value.status == 502


# --- a preview of the demo sandbox -----------------------------------------------------------


async def create_preview(dev, http, token: str | None) -> tuple[int, dict]:
    body = {"namespace": "sandboxes", "sandbox": "demo", "port": dev.stack.sandbox[1]}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.post(dev.public_url + "/gateway/v1/previews", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


def preview_host(created: dict) -> dict:
    """The Host header of a request for the preview: its name is under the shipped zone, so the
    request is sent to the gateway's own address, as curl --connect-to does in the tour."""
    return {"Host": URL(created["url"]).raw_authority}


async def test_the_dev_token_opens_a_preview_whose_host_reaches_the_demo_sandbox(dev, http):
    token = await sandbox_token(dev, http)
    status, created = await create_preview(dev, http, token)
    assert status == 201, created
    url, host = URL(created["url"]), preview_host(created)
    assert url.host == f"{created['token']}-preview.agents-preview.example.net"  # the shipped zone
    assert (url.scheme, url.port, url.path) == ("http", URL(dev.public_url).port, "/")  # the gateway's listener
    async with http.post(dev.public_url + "/chat", json={"message": "hi"}, headers=host) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["reply"] == "Sandbox sandboxes/demo heard: hi"
    # Preview traffic carries no platform credentials, and a WebSocket works as on any route.
    async with http.get(dev.public_url + "/whoami", headers={**host, "Authorization": f"Bearer {token}"}) as resp:
        seen = await resp.json()
    assert seen["path"] == "/whoami" and "authorization" not in {h.lower() for h in seen["headers"]}
    async with http.ws_connect(dev.public_url + "/ws", headers=host) as ws:
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "sandboxes/demo: hello"

    # What the gateway created through the Kubernetes API stand-in
    name = f"preview-{created['token']}"
    kube = await KubeClient.connect(dev.options.kubeconfig)
    try:
        sandbox = await kube.get(SANDBOX, "sandboxes", "demo")
        service = await kube.get(SERVICE, "sandboxes", name)
        route = await kube.get(HTTPROUTE, "sandboxes", name)
    finally:
        await kube.close()
    key, _, value = sandbox["status"]["selector"].partition("=")
    assert service["spec"]["selector"] == {key: value}
    assert route["spec"]["hostnames"] == [url.host]
    parent = route["spec"]["parentRefs"][0]
    assert (parent["name"], parent["namespace"]) == ("sandgate", "platform")  # the zone's gatewayRef
    for obj in (service, route):
        assert obj["metadata"]["labels"] == {"sandgate.dev/preview": "true", "sandgate.dev/sandbox": "demo"}
        assert obj["metadata"]["ownerReferences"][0]["uid"] == sandbox["metadata"]["uid"]


async def test_a_preview_is_listed_kept_alive_and_deleted_and_then_its_host_is_404(dev, http):
    token = await sandbox_token(dev, http)
    _, created = await create_preview(dev, http, token)
    bearer = {"Authorization": f"Bearer {token}"}
    previews = dev.public_url + "/gateway/v1/previews"
    async with http.get(previews, headers=bearer) as resp:
        assert [p["token"] for p in (await resp.json())["previews"]] == [created["token"]]
    async with http.post(f"{previews}/{created['token']}/keepalive", headers=bearer) as resp:
        assert resp.status == 200  # a merge patch of the HTTPRoute's expires-at annotation
        assert (await resp.json())["expires_at"] >= created["expires_at"]
    async with http.delete(f"{previews}/{created['token']}", headers=bearer) as resp:
        assert resp.status == 204  # the HTTPRoute with its uid as precondition, then the Service
    async with http.get(dev.public_url + "/", headers=preview_host(created)) as resp:
        assert resp.status == 404
    kube = await KubeClient.connect(dev.options.kubeconfig)
    try:
        left = [await kube.get(kind, "sandboxes", f"preview-{created['token']}") for kind in (SERVICE, HTTPROUTE)]
    finally:
        await kube.close()
    assert left == [None, None]


async def test_a_preview_deleted_in_the_cluster_stops_being_served(dev, http):
    """The gateway learns it from its watch of preview HTTPRoutes on the stand-in."""
    _, created = await create_preview(dev, http, await sandbox_token(dev, http))
    host = preview_host(created)

    async def gone() -> bool:
        async with http.get(dev.public_url + "/", headers=host) as resp:
            return resp.status == 404

    assert not await gone()
    kube = await KubeClient.connect(dev.options.kubeconfig)
    try:
        assert await kube.delete(HTTPROUTE, "sandboxes", f"preview-{created['token']}")  # kubectl delete
    finally:
        await kube.close()
    assert await wait_for(gone)


async def test_previews_need_the_token_of_someone_who_may_reach_the_sandbox(dev, http):
    assert (await create_preview(dev, http, None))[0] == 401
    status, body = await create_preview(dev, http, token_for(dev, "someone-else"))
    assert (status, body["error"]) == (404, "sandbox_not_found")
    guessed = {"Host": f"{'a' * 26}-preview.agents-preview.example.net"}
    async with http.get(dev.public_url + "/", headers=guessed) as resp:
        assert resp.status == 404


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("bash")), reason="needs curl and bash")
async def test_the_printed_try_commands_work(dev):
    """The tour `sandgate dev` prints, run as a newcomer would paste it."""
    commands = try_commands(dev.public_url, dev.stack.sandbox[1])
    script = "set -e\n" + "".join(f"{command}\necho '<<<{i}>>>'\n" for i, command in enumerate(commands))
    # No proxy: a proxy would be asked for the preview's host name, which must never leave here.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, out.decode(errors="replace")
    chunks = re.split(r"<<<\d+>>>\n", out.decode())[:-1]
    statuses = [m.group(1) if (m := re.search(r"^HTTP/1\.1 (\d{3})", c, re.M)) else None for c in chunks]
    # Every URL answers 200, except /mcp without a token; then the MCP token (no output) and its
    # use on /mcp; the platform token (no output) and its use on the sandbox by headers and
    # through the port proxy; a preview of the sandbox's port (its URL kept, no output) and the
    # preview's host.
    tail = ["401", None, "200", None, "200", "200", None, "200"]
    assert statuses == ["200"] * (len(commands) - len(tail)) + tail, statuses
    assert '"serverInfo":{"name":"sandgate-dev-mcp"' in chunks[-6]
    reached = [chunks[-4], chunks[-3], chunks[-1]]
    assert all('"reply": "Sandbox sandboxes/demo heard: hello"' in chunk for chunk in reached), reached
