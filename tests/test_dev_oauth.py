"""`sandgate dev` end to end: the shipped routes.yaml, the stand-ins and the dev SecurityPolicy,
set up by the command's own `dev_environment`, with real clients on loopback.

The MCP route needs a JWT from the API stand-in's issuer: without one a client gets a 401 that
points at the RFC 9728 metadata; with one from `POST /oauth/token` (through the gateway) the
official `mcp` SDK client works; `/mcp/health` stays public; readiness waits for the JWKS.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
from pathlib import Path

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.commands.dev import dev_environment
from gateway.devstack import API_SERVICE, MCP_SCOPE, try_commands
from gateway.server.app import start_gateway
from tests.support.policy_harness import assert_error_body, challenge_params, readiness, wait_ready

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
            assert await wait_ready(running, timeout=10)
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


async def test_readiness_waits_for_the_issuers_keys(dev):
    status, details = await readiness(dev.running)
    assert status == 200
    assert details["jwks_loaded"] is True


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


async def test_the_policies_directory_is_removed_on_exit(tmp_path):
    async with dev_environment(ROUTES, f"127.0.0.1:{_free_port()}", None, data_dir=str(tmp_path)) as env:
        policies = env.options.policies
        assert os.listdir(policies) == ["mcp.yaml"]
    assert not os.path.exists(policies)


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("bash")), reason="needs curl and bash")
async def test_the_printed_try_commands_work(dev):
    """The tour `sandgate dev` prints, run as a newcomer would paste it."""
    commands = try_commands(dev.public_url)
    script = "set -e\n" + "".join(f"{command}\necho '<<<{i}>>>'\n" for i, command in enumerate(commands))
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, out.decode(errors="replace")
    chunks = re.split(r"<<<\d+>>>\n", out.decode())[:-1]
    statuses = [m.group(1) if (m := re.search(r"^HTTP/1\.1 (\d{3})", c, re.M)) else None for c in chunks]
    # Every URL answers 200, except /mcp without a token; then the token (no output) and its use.
    assert statuses == ["200"] * (len(commands) - 3) + ["401", None, "200"], statuses
    assert '"serverInfo":{"name":"sandgate-dev-mcp"' in chunks[-1]
