"""What separates sandboxes from the platform (SPEC §4.1): no platform credential reaches a
sandbox pod, and what a sandbox answers cannot act in the platform's origin. Real sandbox apps
on loopback report what they received; the Kubernetes API double holds the sandboxes."""

from __future__ import annotations

import json
import secrets

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.support.fixtures import issuer, world  # noqa: F401 - fixtures
from tests.support.harness import backend, running_gateway, url
from tests.support.issuer import claims
from tests.support.policy_harness import provider, route_target, security_policy
from tests.support.sandboxes import router_yaml
from gateway.server.handler import Settings

LOOPBACK = Settings(allow_loopback_sandboxes=True)
SANDBOX_POLICY = {
    "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPolicy",
    "metadata": {"name": "who", "namespace": "platform"},
    "spec": {"targetRefs": [route_target("sandboxes")], "owner": {"annotation": "sandgate.dev/owner"}},
}
# A second route, with an API-key policy that never sees sandbox traffic: the places it reads a
# key from are platform credentials all the same.
OTHER_ROUTE = backend("elsewhere", 9, namespace="platform") + """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: other, namespace: platform}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /other}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: elsewhere}]
"""


def policies(issuer, *, sanitize: bool) -> str:
    jwt = {"providers": [provider(issuer, extractFrom={
        "headers": [{"name": "X-Platform-Token"}], "cookies": ["plat_sess"], "params": ["tok"],
    })]}
    api_key = {"credentialRefs": [{"group": "sandgate.dev", "kind": "ApiKeyStore", "name": "default"}],
               "extractFrom": [{"headers": ["X-Team-Key"]}, {"params": ["team_key"]}, {"cookies": ["key_jar"]}],
               "sanitize": sanitize}
    return (security_policy("sandbox-jwt", {"jwt": jwt}, targets=[route_target("sandboxes")], namespace="platform")
            + security_policy("other-keys", {"apiKeyAuth": api_key}, targets=[route_target("other")], namespace="platform")
            + "---\n" + yaml.safe_dump(SANDBOX_POLICY, sort_keys=False))


@pytest.fixture
def pepper(tmp_path, monkeypatch):
    path = tmp_path / "pepper"
    path.write_bytes(secrets.token_hex(16).encode())
    monkeypatch.setenv("SANDGATE_API_KEY_PEPPER_FILE", str(path))


def _received(world, since: int) -> list[tuple[str, dict]]:
    return [(raw_path, {k.lower(): v for k, v in headers.items()}) for _, _, raw_path, headers in world.received[since:]]


@pytest.mark.parametrize("sanitize", [False, True])
async def test_no_platform_credential_reaches_a_sandbox_over_http_or_websocket(tmp_path, world, issuer, pepper, sanitize):
    _, port = await world.add("agents", "alice-box", owner="alice")
    token = issuer.mint(claims(sub="alice"))
    sent_headers = {
        "X-Platform-Token": token,  # the credential this request is authenticated with
        "Authorization": "Bearer another-platform-token",
        "Proxy-Authorization": "Basic cHJveHk6cGFzcw==",
        "X-Team-Key": "sgk_team_key_value",
        "Cookie": "theme=dark; plat_sess=session-secret; key_jar=jar-secret; sandbox_own=kept",
        "X-Kept": "yes",
    }
    query = "tok=query-secret&keep=1&team_key=key-secret&t%6Fk=encoded-secret&team+key=x&tok"
    secrets_sent = ("session-secret", "jar-secret", "query-secret", "key-secret", "encoded-secret", "sgk_team_key_value",
                    "another-platform-token", "cHJveHk6cGFzcw==", token)
    async with running_gateway(tmp_path, router_yaml() + OTHER_ROUTE, settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                               policies_yaml=policies(issuer, sanitize=sanitize)) as gw:
        async with aiohttp.ClientSession() as session:
            requests = [
                url(gw, f"/echo?{query}"),  # header-routed
                url(gw, f"/gateway/v1/sandboxes/agents/alice-box/ports/{port}/echo?{query}"),  # port proxy
            ]
            for i, target in enumerate(requests):
                extra = {"X-Sandbox-ID": "alice-box", "X-Sandbox-Port": str(port)} if i == 0 else {}
                async with session.get(target, headers={**sent_headers, **extra}) as response:
                    assert response.status == 200, await response.text()
            for ws_target, extra in ((url(gw, f"/ws?{query}"), {"X-Sandbox-ID": "alice-box", "X-Sandbox-Port": str(port)}),
                                     (url(gw, f"/gateway/v1/sandboxes/agents/alice-box/ports/{port}/ws?{query}"), {})):
                async with session.ws_connect(ws_target, headers={**sent_headers, **extra}) as ws:
                    assert json.loads((await ws.receive()).data)["backend"] == "agents/alice-box"
    received = _received(world, 0)
    assert len(received) == 4
    for raw_path, headers in received:
        flat = raw_path + json.dumps(headers)
        for secret in secrets_sent:
            assert secret not in flat, (secret, raw_path, headers)
        assert not {"authorization", "proxy-authorization", "x-platform-token", "x-team-key"} & headers.keys()
        assert headers["cookie"] == "theme=dark; sandbox_own=kept"
        assert headers["x-kept"] == "yes"
        assert raw_path.split("?", 1)[1] == "keep=1&team+key=x"


def _hostile_page_app() -> web.Application:
    """A sandbox app that tries to act for the platform: a cookie for the parent domain, its own
    permissive CSP, and HTML with script."""

    async def page(request: web.Request) -> web.Response:
        response = web.Response(text="<html><script>fetch('/api/me')</script></html>", content_type="text/html")
        response.headers.add("Set-Cookie", "a=b; Domain=.example.com; Path=/")
        response.headers.add("Set-Cookie", "c=d; path=/;   DOMAIN = example.com ;HttpOnly")
        response.headers.add("Content-Security-Policy", "script-src * 'unsafe-inline'")
        response.headers.add("Clear-Site-Data", '"cookies", "storage"')
        if request.query.get("plant"):  # a platform session cookie of the attacker's choosing
            response.headers.add("Set-Cookie", f"{request.query['plant']}=attackers-session; Path=/")
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    return app


def _router_with(csp: str | None) -> str:
    text = router_yaml(token_file=None, allow_unauthenticated=True)
    if csp is None:
        return text
    head, _, router = text.rpartition("---\n")
    doc = yaml.safe_load(router)
    doc["spec"]["contentSecurityPolicy"] = csp
    return head + "---\n" + yaml.safe_dump(doc, sort_keys=False)


@pytest.mark.parametrize("csp, expected", [
    (None, "sandbox"),
    ("sandbox allow-scripts allow-forms", "sandbox allow-scripts allow-forms"),
    ("", None),
])
async def test_sandbox_responses_get_host_only_cookies_and_an_opaque_origin(tmp_path, world, csp, expected):
    _, port = await world.add("agents", "page", app=_hostile_page_app())
    async with running_gateway(tmp_path, _router_with(csp), settings=LOOPBACK, kubeconfig=world.api.kubeconfig) as gw:
        async with aiohttp.ClientSession() as session:
            answers = []
            for target, headers in ((url(gw, "/index.html"), {"X-Sandbox-ID": "page", "X-Sandbox-Port": str(port)}),
                                    (url(gw, f"/gateway/v1/sandboxes/agents/page/ports/{port}/index.html"), {})):
                async with session.get(target, headers=headers) as response:
                    assert response.status == 200
                    answers.append(response.headers.copy())
    for headers in answers:
        cookies = headers.getall("Set-Cookie")
        assert len(cookies) == 2
        assert all("domain" not in c.lower() for c in cookies), cookies
        assert cookies[0].startswith("a=b") and cookies[1].startswith("c=d")
        assert "Clear-Site-Data" not in headers
        policies_sent = headers.getall("Content-Security-Policy", [])
        # the sandbox's own CSP stays (browsers enforce every one), ours comes last and cannot be weakened
        assert policies_sent[0] == "script-src * 'unsafe-inline'"
        assert policies_sent[1:] == ([expected] if expected else [])


@pytest.mark.parametrize("csp", ["sandbox allow-same-origin allow-scripts", "sandbox allow-top-navigation", "default-src *"])
async def test_a_router_csp_that_would_give_back_the_platform_origin_is_refused(tmp_path, capsys, csp):
    from gateway.cli import main

    routes = tmp_path / "routes.yaml"
    (tmp_path / "policies").mkdir()
    check = ["check", "--routes", str(routes), "--policies", str(tmp_path / "policies")]
    routes.write_text(_router_with("sandbox allow-scripts"))
    assert main(check) == 0
    capsys.readouterr()
    routes.write_text(_router_with(csp))
    assert main(check) == 1
    assert "contentSecurityPolicy" in capsys.readouterr().out


async def test_a_sandbox_cannot_plant_a_platform_session_cookie(tmp_path, world, issuer, pepper):
    """Served on the platform's host, a sandbox could set a cookie under a name a policy reads
    credentials from, or an OIDC session cookie's (login CSRF): such Set-Cookies are dropped,
    others pass."""
    _, port = await world.add("agents", "page", owner="alice", app=_hostile_page_app())
    token = issuer.mint(claims(sub="alice"))
    async with running_gateway(tmp_path, router_yaml() + OTHER_ROUTE, settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                               policies_yaml=policies(issuer, sanitize=False)) as gw:
        async with aiohttp.ClientSession() as session:
            answers = []
            for plant in ("plat_sess", "key_jar", "BearerToken-0a1b2c", "harmless"):
                async with session.get(url(gw, f"/gateway/v1/sandboxes/agents/page/ports/{port}/?plant={plant}"),
                                       headers={"X-Platform-Token": token}) as response:
                    assert response.status == 200
                    answers.append([c.split("=", 1)[0] for c in response.headers.getall("Set-Cookie")])
    assert answers == [["a", "c"], ["a", "c"], ["a", "c"], ["a", "c", "harmless"]]


async def test_a_token_sent_as_a_websocket_subprotocol_never_reaches_the_sandbox(tmp_path, world, issuer):
    """Browsers cannot set headers on a WebSocket, so platforms read the token from
    `Sec-WebSocket-Protocol`; the sandbox is offered no subprotocol carrying it."""
    _, port = await world.add("agents", "alice-box", owner="alice")
    token = issuer.mint(claims(sub="alice"))
    jwt = {"providers": [provider(issuer, extractFrom={
        "headers": [{"name": "Sec-WebSocket-Protocol", "valuePrefix": "bearer.token,"}]})]}
    policies_yaml = (security_policy("sandbox-jwt", {"jwt": jwt}, targets=[route_target("sandboxes")], namespace="platform")
                     + "---\n" + yaml.safe_dump(SANDBOX_POLICY, sort_keys=False))
    async with running_gateway(tmp_path, router_yaml(), settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                               policies_yaml=policies_yaml) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url(gw, f"/gateway/v1/sandboxes/agents/alice-box/ports/{port}/ws"),
                                          protocols=["bearer.token", token]) as ws:
                assert json.loads((await ws.receive()).data)["backend"] == "agents/alice-box"
    received = _received(world, 0)
    assert len(received) == 1
    assert token not in json.dumps(received[0][1]) and "sec-websocket-protocol" not in received[0][1]
