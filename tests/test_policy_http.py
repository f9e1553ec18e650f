"""Authorization, attachment precedence, CORS, MCP protected-resource behaviour and policy metrics
(SPEC §2.2, §3.2–§3.4), through a running gateway with a real JWKS issuer and a recording echo
upstream. Every refused request is also checked never to have reached the upstream.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import jwt as pyjwt
import pytest

from gateway.audit import AuditSettings
from gateway.server.handler import Settings
from tests.support.fixtures import issuer, recording_echo  # noqa: F401 (fixtures)
from tests.support.harness import (GATEWAY, access_records, backend, echo_routes, mcp_routes, route_to, running_gateway,
                                   url)
from tests.support.issuer import ISSUER, claims
from tests.support.policy_harness import (
    assert_denied,
    assert_error_body,
    assert_missing,
    assert_refused,
    call,
    challenge_params,
    gateway_target,
    metric_samples,
    metric_value,
    prefix_route,
    provider,
    route_target,
    security_policy,
    wait_for,
    wait_ready,
)

REPO = Path(__file__).resolve().parent.parent


def authorization(rules: list[dict], default: str | None = None) -> dict:
    spec = {"rules": rules}
    if default:
        spec["defaultAction"] = default
    return {"authorization": spec}


def jwt_spec(issuer, **provider_fields) -> dict:
    return {"jwt": {"providers": [provider(issuer, **provider_fields)]}}


@asynccontextmanager
async def gateway(tmp_path, upstream, spec: dict, *, settings: Settings | None = None):
    """A gateway with SecurityPolicy `p` on route `echo`, once its key sets are loaded."""
    policy = security_policy("p", spec)
    async with running_gateway(tmp_path, echo_routes(upstream.port), policies_yaml=policy, settings=settings) as gw:
        assert await wait_ready(gw)
        yield gw


async def expect(gw, upstream, path: str, status: int, code: str | None = None, **kw):
    """One request; a refusal must carry `code` and must not reach the upstream."""
    before = len(upstream.requests)
    result = await call(gw, path, **kw)
    assert result[0] == status, (path, kw.get("method"), result[0], result[2])
    if status == 200:
        assert len(upstream.requests) == before + 1
    else:
        assert len(upstream.requests) == before, "a refused request reached the upstream"
        if code is not None:
            assert result[2]["violations"][0]["code"] == code, result[2]
        if status == 403:
            assert_error_body(result[2], "policy_violation", code or result[2]["violations"][0]["code"])
    return result


ALLOW_ALL = {"action": "Allow"}


# --- rule order and defaultAction ----------------------------------------------------------------

async def test_first_matching_rule_decides_deny_before_allow(tmp_path, upstream):
    deny_admin = {"name": "no-admin", "action": "Deny", "operation": {"path": {"type": "PathPrefix", "value": "/admin"}}}
    async with gateway(tmp_path, upstream, authorization([deny_admin, ALLOW_ALL])) as gw:
        result = await expect(gw, upstream, "/admin/users", 403, "authorization-rule-denied")
        assert "no-admin" in result[2]["violations"][0]["message"]
        await expect(gw, upstream, "/other", 200)


async def test_first_matching_rule_decides_allow_before_deny(tmp_path, upstream):
    deny_admin = {"action": "Deny", "operation": {"path": {"type": "PathPrefix", "value": "/admin"}}}
    async with gateway(tmp_path, upstream, authorization([ALLOW_ALL, deny_admin])) as gw:
        await expect(gw, upstream, "/admin/users", 200)


@pytest.mark.parametrize("default, status", [(None, 403), ("Deny", 403), ("Allow", 200)])
async def test_default_action_when_no_rule_matches(tmp_path, upstream, default, status):
    rule = {"action": "Allow", "principal": {"headers": [{"name": "X-Pass", "values": ["yes"]}]}}
    async with gateway(tmp_path, upstream, authorization([rule], default)) as gw:
        await expect(gw, upstream, "/", 200, headers={"X-Pass": "yes"})
        await expect(gw, upstream, "/", status, "authorization-default-deny" if status == 403 else None)


# --- principals -------------------------------------------------------------------------------

@pytest.mark.parametrize("cidrs, trusted_hops, xff, status", [
    (["127.0.0.0/8"], 0, None, 200),
    (["10.0.0.0/8"], 0, None, 403),
    (["10.0.0.0/8"], 0, "10.1.2.3", 403),  # a client cannot claim an address
    (["10.0.0.0/8", "::1/128"], 0, None, 403),
    (["10.0.0.0/8"], 1, "10.1.2.3", 200),  # behind one trusted proxy the client is the XFF entry
    (["127.0.0.0/8"], 1, "10.1.2.3", 403),  # ... and no longer the proxy's address
], ids=["loopback", "ten-net", "ten-net-spoofed-xff", "v6-only", "trusted-hop", "trusted-hop-not-proxy"])
async def test_client_cidrs(tmp_path, upstream, cidrs, trusted_hops, xff, status):
    rule = {"action": "Allow", "principal": {"clientCIDRs": cidrs}}
    async with gateway(tmp_path, upstream, authorization([rule]), settings=Settings(trusted_hops=trusted_hops)) as gw:
        await expect(gw, upstream, "/", status, "authorization-default-deny" if status == 403 else None,
                     headers={"X-Forwarded-For": xff} if xff else None)


CLAIM_RULES = [
    {"name": "role", "action": "Allow", "principal": {"jwt": {"provider": "idp", "claims": [
        {"name": "role", "values": ["admin", "owner"]}]}}},
    {"name": "groups", "action": "Allow", "principal": {"jwt": {"provider": "idp", "claims": [
        {"name": "groups", "valueType": "StringArray", "values": ["eng"]}]}}},
    {"name": "nested", "action": "Allow", "principal": {"jwt": {"provider": "idp", "claims": [
        {"name": "org.team", "values": ["core"]}, {"name": "org.tier", "values": ["gold"]}]}}},
]


@pytest.mark.parametrize("extra, status", [
    ({"role": "owner"}, 200),
    ({"role": "user"}, 403),
    ({"role": "Admin"}, 403),
    ({"role": ["user", "admin"]}, 200),  # any element of a string array
    ({"role": {"name": "admin"}}, 403),
    ({"groups": ["sales", "eng"]}, 200),
    ({"groups": ["sales"]}, 403),
    ({"groups": "eng"}, 200),
    ({"org": {"team": "core", "tier": "gold"}}, 200),
    ({"org": {"team": "core", "tier": "free"}}, 403),  # every claim of a rule must match
    ({"org": {"team": "core"}}, 403),
    ({"org.team": "core", "org.tier": "gold"}, 403),  # dotted names are paths, not literal keys
    ({}, 403),
], ids=lambda v: str(v) if not isinstance(v, int) else None)
async def test_jwt_claims(tmp_path, issuer, upstream, extra, status):
    async with gateway(tmp_path, upstream, {**jwt_spec(issuer), **authorization(CLAIM_RULES)}) as gw:
        await expect(gw, upstream, "/", status, "authorization-default-deny" if status == 403 else None,
                     token=issuer.mint(claims(**extra)))


@pytest.mark.parametrize("extra, status", [
    ({"scope": "read write"}, 200),
    ({"scope": "write profile read"}, 200),
    ({"scp": ["read", "write"]}, 200),
    ({"scp": "read write"}, 200),
    ({"scope": "read"}, 403),
    ({"scope": "readwrite"}, 403),
    ({"scp": ["read write"]}, 403),
    ({}, 403),
], ids=lambda v: str(v) if not isinstance(v, int) else None)
async def test_jwt_scopes_are_all_required(tmp_path, issuer, upstream, extra, status):
    rule = {"action": "Allow", "principal": {"jwt": {"provider": "idp", "scopes": ["read", "write"]}}}
    async with gateway(tmp_path, upstream, {**jwt_spec(issuer), **authorization([rule])}) as gw:
        await expect(gw, upstream, "/", status, "insufficient-scope" if status == 403 else None,
                     token=issuer.mint(claims(**extra)))


async def test_header_principal(tmp_path, upstream):
    rule = {"action": "Allow", "principal": {"headers": [{"name": "X-Tenant", "values": ["acme", "globex"]}]}}
    async with gateway(tmp_path, upstream, authorization([rule])) as gw:
        await expect(gw, upstream, "/", 200, headers={"X-Tenant": "acme"})
        await expect(gw, upstream, "/", 200, headers={"x-tenant": "globex"})
        await expect(gw, upstream, "/", 403, "authorization-default-deny", headers={"X-Tenant": "ACME"})
        await expect(gw, upstream, "/", 403, "authorization-default-deny")


async def test_operation_methods_and_path_with_invert(tmp_path, upstream):
    rules = [
        {"name": "read-docs", "action": "Allow",
         "operation": {"methods": ["GET", "HEAD"], "path": {"type": "PathPrefix", "value": "/docs"}}},
        {"name": "only-public", "action": "Deny",
         "operation": {"path": {"type": "PathPrefix", "value": "/public", "invert": True}}},
        ALLOW_ALL,
    ]
    async with gateway(tmp_path, upstream, authorization(rules)) as gw:
        for method, path, status in [
            ("GET", "/docs", 200), ("GET", "/docs/a", 200), ("HEAD", "/docs/a", 200),
            ("POST", "/docs/a", 403), ("GET", "/Docs/a", 403), ("GET", "/docsx", 403),
            ("GET", "/public/x", 200), ("POST", "/public", 200),
            ("GET", "/publicity", 403), ("GET", "/private", 403),
            ("GET", "/public/../private", 403), ("GET", "/public/%2e%2e/private", 403),
        ]:
            await expect(gw, upstream, path, status, "authorization-rule-denied" if status == 403 else None,
                         method=method)


READ_DOCS = {"name": "read-docs", "action": "Allow", "principal": {"jwt": {"provider": "idp"}},
             "operation": {"methods": ["GET"], "path": {"type": "PathPrefix", "value": "/docs"}}}
TENANT = {"name": "tenant", "action": "Allow",
          "principal": {"jwt": {"provider": "idp"}, "headers": [{"name": "X-Tenant", "values": ["acme"]}]}}


@pytest.mark.parametrize("rules", [[READ_DOCS], [TENANT, READ_DOCS]], ids=["operation-only", "with-header-rule"])
async def test_a_repeated_token_is_decided_afresh_for_each_header_method_and_path(tmp_path, issuer, upstream, rules):
    """A verified token's decision is kept with the token only where nothing else can change it."""
    token = issuer.mint(claims())
    cases = [("/docs/a", "GET", {}, 200), ("/docs/a", "POST", {}, 403), ("/other", "GET", {}, 403),
             ("/docs/a", "GET", {}, 200), ("/other", "GET", {}, 403)]
    if TENANT in rules:
        cases += [("/x", "GET", {"X-Tenant": "acme"}, 200), ("/x", "GET", {"X-Tenant": "other"}, 403),
                  ("/x", "GET", {}, 403), ("/x", "GET", {"X-Tenant": "acme"}, 200),
                  ("/docs/a", "POST", {"X-Tenant": "acme"}, 200), ("/docs/a", "POST", {}, 403)]
    async with gateway(tmp_path, upstream, {**jwt_spec(issuer), **authorization(rules)}) as gw:
        for path, method, headers, status in cases:
            await expect(gw, upstream, path, status, "authorization-default-deny" if status == 403 else None,
                         token=token, method=method, headers=headers)


async def test_a_repeated_allowed_request_is_recorded_and_forwarded_like_the_first(tmp_path, issuer, upstream):
    """Repeats of an allowed token, route, method and path reuse its decision: each still gets
    its own audit record (with --audit-allowed every; rollups: tests/test_audit_through_gateway.py), log
    fields and count, and claimToHeaders; expiry and a policy reload end the reuse."""
    spec = {"jwt": {"providers": [provider(issuer, claimToHeaders=[{"claim": "sub", "header": "X-User-Sub"}])]},
            **authorization([READ_DOCS])}
    token = issuer.mint(claims())
    short_lived = issuer.mint(claims(sub="user-2", exp=int(time.time()) + 2))
    async with running_gateway(tmp_path, echo_routes(upstream.port), policies_yaml=security_policy("p", spec),
                               reload_interval=0.1, audit=AuditSettings(allowed="every")) as gw:
        assert await wait_ready(gw)
        for _ in range(3):
            await expect(gw, upstream, "/docs/a", 200, token=token, headers={"X-User-Sub": "forged"})
            assert upstream.headers(-1, "X-User-Sub") == ["user-1"]
        lines = [r for r in access_records(gw) if r["path"] == "/docs/a"]
        assert len(lines) == 3
        assert len({r["audit_id"] for r in lines}) == len({r["request_id"] for r in lines}) == 3
        assert {(r["policy"], r["decision"], r["principal"], r["credential"]) for r in lines} == {
            ("infra/p", "allow", f"{ISSUER}#user-1", lines[0]["credential"])}
        assert lines[0]["credential"] and lines[0]["reasons"] == []
        assert await wait_for(lambda: _decisions_stored(gw, 3))
        stored = {r.id: r for r in await gw.store.list_audit(kind="decision")}
        for line in lines:
            record = stored[line["audit_id"]]
            assert (record.request_id, record.path, record.method, record.principal, record.decision) == (
                line["request_id"], "/docs/a", "GET", f"{ISSUER}#user-1", "allow")
            assert record.detail == {"credential": line["credential"]} and record.latency_ms >= 0
        assert await metric_value(gw, "sandgate_policy_decisions_total", policy="infra/p", decision="allow") == 3

        await expect(gw, upstream, "/docs/a", 200, token=short_lived)
        await asyncio.sleep(max(0.0, claims_of(short_lived)["exp"] - time.time()) + 0.1)
        await expect(gw, upstream, "/docs/a", 401, "token-expired", token=short_lived)

        stricter = {**spec, **authorization([], default="Deny")}
        (tmp_path / "policies" / "policies.yaml").write_text(security_policy("p", stricter))
        reloaded = await wait_for(lambda: _refused(gw, token), timeout=10)
        assert reloaded, "the decision kept from before the reload still allowed the token"
        await expect(gw, upstream, "/docs/a", 403, "authorization-default-deny", token=token)


async def _decisions_stored(gw, count: int) -> bool:
    return await gw.store.count_audit(kind="decision") >= count


async def _refused(gw, token: str) -> bool:
    return (await call(gw, "/docs/a", token=token))[0] == 403


def claims_of(token: str) -> dict:
    return pyjwt.decode(token, options={"verify_signature": False})


# --- 401 vs 403, optional JWT -----------------------------------------------------------------

async def test_missing_token_is_401_and_a_denied_token_is_403(tmp_path, issuer, upstream):
    rule = {"action": "Allow", "principal": {"jwt": {"provider": "idp", "claims": [{"name": "role", "values": ["admin"]}]}}}
    async with gateway(tmp_path, upstream, {**jwt_spec(issuer), **authorization([rule])}) as gw:
        assert_missing(await call(gw), upstream)
        assert_refused(await call(gw, token=issuer.mint(claims(aud="elsewhere"))), "token-audience-mismatch", upstream)
        assert_denied(await call(gw, token=issuer.mint(claims(role="user"))), "authorization-default-deny", upstream)
        await expect(gw, upstream, "/", 200, token=issuer.mint(claims(role="admin")))


async def test_optional_jwt_lets_anonymous_requests_reach_authorization(tmp_path, issuer, upstream):
    rules = [{"action": "Allow", "principal": {"clientCIDRs": ["127.0.0.0/8"]}}]
    spec = {"jwt": {"optional": True, "providers": [provider(issuer, claimToHeaders=[{"claim": "sub", "header": "X-User"}])]},
            **authorization(rules)}
    async with gateway(tmp_path, upstream, spec) as gw:
        await expect(gw, upstream, "/", 200, headers={"X-User": "admin"})
        assert upstream.headers(-1, "X-User") == []  # an anonymous caller cannot name itself
        upstream.requests.clear()
        assert_refused(await call(gw, token=issuer.mint(claims(exp=1))), "token-expired", upstream)
        await expect(gw, upstream, "/", 200, token=issuer.mint(claims(sub="alice")), headers={"X-User": "admin"})
        assert upstream.headers(-1, "X-User") == ["alice"]


async def test_optional_jwt_without_token_fails_a_rule_that_needs_claims_with_401(tmp_path, issuer, upstream):
    rule = {"action": "Allow", "principal": {"jwt": {"provider": "idp", "scopes": ["read"]}}}
    async with gateway(tmp_path, upstream, {"jwt": {"optional": True, "providers": [provider(issuer)]},
                                          **authorization([rule])}) as gw:
        assert_missing(await call(gw), upstream)
        await expect(gw, upstream, "/", 200, token=issuer.mint(claims(scope="read")))


# --- attachment precedence --------------------------------------------------------------------

def precedence_routes(port: int) -> str:
    return GATEWAY + backend("echo", port) + """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: infra}
spec:
  parentRefs: [{name: gw}]
  rules:
  - name: open
    matches: [{path: {type: PathPrefix, value: /open}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: echo}]
  - name: rest
    matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: echo}]
""" + prefix_route("other", "/other")


def tagged(name: str, targets: list[dict], created: str | None = None) -> str:
    """A policy that lets a request through only when it says `X-Pass: <its name>`."""
    rule = {"action": "Allow", "principal": {"headers": [{"name": "X-Pass", "values": [name]}]}}
    return security_policy(name, authorization([rule], "Deny"), targets=targets, created=created)


T1, T2 = "2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z"
ROUTE, RULE_OPEN, GW = [route_target("echo")], [route_target("echo", "open")], [gateway_target()]

PRECEDENCE = {  # policies (in document order) → which policy governs each path
    "gateway-only": (tagged("gw-p", GW), {"/open": "gw-p", "/x": "gw-p", "/other": "gw-p"}),
    "route-beats-gateway": (tagged("gw-p", GW, T1) + tagged("route-p", ROUTE, T2),
                            {"/open": "route-p", "/x": "route-p", "/other": "gw-p"}),
    "rule-beats-route": (tagged("rule-p", RULE_OPEN, T2) + tagged("route-p", ROUTE, T1) + tagged("gw-p", GW, T1),
                         {"/open": "rule-p", "/x": "route-p", "/other": "gw-p"}),
    "oldest-wins": (tagged("a-new", ROUTE, T2) + tagged("z-old", ROUTE, T1), {"/x": "z-old"}),
    "same-age-by-name": (tagged("zeta", ROUTE, T1) + tagged("alpha", ROUTE, T1), {"/x": "alpha"}),
    "same-age-by-name-on-rule": (tagged("zeta", RULE_OPEN, T1) + tagged("alpha", RULE_OPEN, T1), {"/open": "alpha"}),
}


@pytest.mark.parametrize("case", list(PRECEDENCE))
async def test_policy_precedence(tmp_path, upstream, case):
    policies, expected = PRECEDENCE[case]
    names = sorted(set(re.findall(r"^  name: (\S+)$", policies, re.M)))
    async with running_gateway(tmp_path, precedence_routes(upstream.port), policies_yaml=policies) as gw:
        for path, winner in expected.items():
            passing = [name for name in names if (await call(gw, path, headers={"X-Pass": name}))[0] == 200]
            assert passing == [winner], f"{path}: governed by {passing}, expected {winner}"


async def test_winning_policy_replaces_the_parent_without_merging(tmp_path, issuer, upstream):
    policies = (security_policy("gw-jwt", jwt_spec(issuer), targets=GW)
                + security_policy("route-open", authorization([], "Allow"), targets=ROUTE))
    async with running_gateway(tmp_path, precedence_routes(upstream.port), policies_yaml=policies) as gw:
        assert await wait_ready(gw)
        await expect(gw, upstream, "/x", 200)  # the route's policy has no jwt: none is required
        assert (await call(gw, "/other"))[0] == 401  # the Gateway's policy still governs `other`


# --- sandgate check -----------------------------------------------------------------------------

BAD_POLICIES = """\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: ghost, namespace: infra}
spec:
  targetRefs:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: ghost}
  authorization: {defaultAction: Allow}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: nosection, namespace: infra}
spec:
  targetRefs:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: echo, sectionName: nope}
  authorization: {defaultAction: Allow}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: badenum, namespace: infra}
spec:
  targetRefs:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: echo}
  authorization:
    rules:
    - action: Permit
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: badfield, namespace: infra}
spec:
  targetRefs:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: echo}
  jwt:
    providers:
    - name: idp
      remoteJWKS:
        url: http://127.0.0.1:1/jwks.json
"""


def run_check(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--routes", "routes.yaml", "--policies", "policies"],
        cwd=cwd, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def document_start(text: str, line: int) -> int:
    return max(n for n, row in enumerate(text.splitlines(), 1) if n <= line and row.startswith("apiVersion:"))


async def test_check_reports_unknown_targets_and_schema_errors_with_file_and_line(tmp_path):
    (tmp_path / "routes.yaml").write_text(GATEWAY + backend("echo", 9) + route_to("echo", rule_name="main"))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "bad.yaml").write_text(BAD_POLICIES)
    result = run_check(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    found: dict[int, list[str]] = {}
    for text in result.stdout.splitlines():
        m = re.match(r"^policies/bad\.yaml:(\d+): (?:SecurityPolicy \S+: )?(.+)$", text)
        if m and not text.endswith("(warning)"):
            found.setdefault(int(m[1]), []).append(m[2])

    def reported(needle: str, *words: str, exact: bool = False) -> bool:
        """An error mentioning all `words` on the line of `needle` (or, unless exact, anywhere
        from its object's first line down to it)."""
        last = line_of(BAD_POLICIES, needle)
        first = last if exact else document_start(BAD_POLICIES, last)
        return any(all(w in message for w in words) for n in range(first, last + 1) for message in found.get(n, []))

    assert reported("name: ghost}", "HTTPRoute", "ghost"), result.stdout
    assert reported("sectionName: nope", "nope"), result.stdout
    assert reported("action: Permit", "Permit", exact=True), result.stdout
    assert reported("url: http", "url", exact=True), result.stdout
    assert reported("remoteJWKS:", "uri", exact=True), result.stdout


async def test_check_accepts_valid_policies_and_lists_public_routes(tmp_path):
    (tmp_path / "routes.yaml").write_text(echo_routes(9) + prefix_route("public-one", "/pub"))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ok.yaml").write_text(security_policy("ok", authorization([ALLOW_ALL])))
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.endswith("(warning)")]
    assert any("public-one" in line and "public" in line for line in warnings), result.stdout
    assert not any("infra/echo " in line for line in warnings), result.stdout


# --- CORS ---------------------------------------------------------------------------------------

APP = "https://app.example.test"
CORS = {"allowOrigins": [APP, "https://*.corp.example.test"], "allowMethods": ["GET", "POST"],
        "allowHeaders": ["Authorization", "Content-Type"], "exposeHeaders": ["X-Request-Id"], "maxAge": "10m",
        "allowCredentials": True}


def vary_tokens(headers) -> set[str]:
    return {t.strip().lower() for value in headers.getall("Vary", ()) for t in value.split(",") if t.strip()}


async def test_cors_preflight_from_an_allowed_origin_is_answered_by_the_gateway(tmp_path, issuer, upstream):
    async with gateway(tmp_path, upstream, {**jwt_spec(issuer), "cors": CORS}) as gw:
        for origin in (APP, "https://a.corp.example.test"):
            status, headers, _ = await call(gw, "/x", method="OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert status == 204
            assert headers["Access-Control-Allow-Origin"] == origin
            assert "POST" in [m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")]
            assert {"authorization", "content-type"} <= {
                h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
            assert headers["Access-Control-Max-Age"] == "600"
            assert headers["Access-Control-Allow-Credentials"] == "true"
            assert "origin" in vary_tokens(headers)
        assert upstream.requests == []


@pytest.mark.parametrize("origin", ["https://evil.example", "https://app.example.test.evil.example",
                                    "http://app.example.test", "https://corp.example.test",
                                    "https://x.corp.example.test.evil.example", "null"])
async def test_cors_preflight_from_another_origin_gets_no_allow_origin(tmp_path, issuer, upstream, origin):
    async with gateway(tmp_path, upstream, {**jwt_spec(issuer), "cors": CORS}) as gw:
        status, headers, _ = await call(gw, "/x", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in headers
        assert "Access-Control-Allow-Credentials" not in headers
        assert status == 401 and upstream.requests == []  # not a preflight we answer: the route needs a token


async def test_cors_simple_request_gets_allow_origin_and_keeps_upstream_vary(tmp_path, issuer, upstream):
    async with gateway(tmp_path, upstream, {**jwt_spec(issuer), "cors": CORS}) as gw:
        status, headers, _ = await call(gw, "/x", token=issuer.mint(),
                                        headers={"Origin": APP, "X-Echo-Set": "Vary: Accept-Encoding"})
        assert status == 200
        assert headers["Access-Control-Allow-Origin"] == APP
        assert headers.getall("Access-Control-Allow-Origin") == [APP]
        assert headers["Access-Control-Allow-Credentials"] == "true"
        assert "x-request-id" in headers["Access-Control-Expose-Headers"].lower()
        assert {"origin", "accept-encoding"} <= vary_tokens(headers), headers.getall("Vary", ())
        status, headers, _ = await call(gw, "/x", token=issuer.mint(), headers={"Origin": "https://evil.example"})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers


# --- WebSocket Origin ----------------------------------------------------------------------------

async def test_websocket_upgrade_from_a_foreign_origin_is_refused(tmp_path, upstream):
    async with gateway(tmp_path, upstream, {**authorization([], "Allow"), "cors": {"allowOrigins": [APP]}}) as gw:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url(gw, "/ws"), origin="https://evil.example")
            assert refused.value.status == 403
            assert upstream.requests == []
            async with session.ws_connect(url(gw, "/ws"), origin=APP) as ws:
                assert (await ws.receive_json(timeout=5))["backend"] == "echo"


# --- MCP routes (SPEC §3.4) ---------------------------------------------------------------------

PUBLIC = "https://agents.example.test"
MCP_URL = PUBLIC + "/mcp"
METADATA_URL = PUBLIC + "/.well-known/oauth-protected-resource/mcp"


@asynccontextmanager
async def mcp_gateway(tmp_path, issuer, upstream):
    rules = [
        {"action": "Allow", "principal": {"jwt": {"provider": "idp", "scopes": ["mcp:tools"]}}},
        {"action": "Allow", "principal": {"jwt": {"provider": "idp", "scopes": ["mcp:read"]}},
         "operation": {"methods": ["GET"]}},
    ]
    text = security_policy("mcp", {**jwt_spec(issuer, audiences=["api", MCP_URL]), **authorization(rules),
                                   "cors": {"allowOrigins": [APP]}}, targets=[route_target("mcp")])
    async with running_gateway(tmp_path, mcp_routes(upstream.port, "echo"), policies_yaml=text,
                               settings=Settings(public_url=PUBLIC)) as gw:
        assert await wait_ready(gw)
        yield gw


def mcp_token(issuer, **extra) -> str:
    return issuer.mint(claims(**{"aud": MCP_URL, "scope": "mcp:tools", **extra}))


@pytest.mark.parametrize("path", ["/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"])
async def test_mcp_protected_resource_metadata(tmp_path, issuer, upstream, path):
    async with mcp_gateway(tmp_path, issuer, upstream) as gw:
        status, _, document = await call(gw, path)
    assert status == 200, document
    assert document["resource"] == MCP_URL
    assert document["authorization_servers"] == [ISSUER]
    assert document["bearer_methods_supported"] == ["header"]
    assert sorted(document["scopes_supported"]) == ["mcp:read", "mcp:tools"]
    assert upstream.requests == []


async def test_mcp_challenges_point_at_the_metadata(tmp_path, issuer, upstream):
    async with mcp_gateway(tmp_path, issuer, upstream) as gw:
        status, headers, body = await call(gw, "/mcp", method="POST")
        assert status == 401 and body["violations"][0]["code"] == "credentials-missing"
        assert challenge_params(headers["WWW-Authenticate"]) == {"realm": "sandgate", "resource_metadata": METADATA_URL}

        result = await call(gw, "/mcp", method="POST", token=mcp_token(issuer, aud="api"))
        assert_refused(result, "token-audience-mismatch", upstream)
        assert challenge_params(result[1]["WWW-Authenticate"])["resource_metadata"] == METADATA_URL

        status, headers, body = await call(gw, "/mcp", method="POST", token=mcp_token(issuer, scope="profile"))
        assert status == 403
        assert_error_body(body, "policy_violation", "insufficient-scope")
        params = challenge_params(headers["WWW-Authenticate"])
        assert params["error"] == "insufficient_scope" and params["scope"] == "mcp:tools"
        assert params["resource_metadata"] == METADATA_URL
        assert upstream.requests == []

        await expect(gw, upstream, "/mcp", 200, method="POST", token=mcp_token(issuer))


async def test_mcp_refuses_tokens_in_the_query(tmp_path, issuer, upstream):
    async with mcp_gateway(tmp_path, issuer, upstream) as gw:
        for path, kw in [(f"/mcp?access_token={mcp_token(issuer)}", {}),
                         (f"/mcp?x=1&access_token={mcp_token(issuer)}", {"token": mcp_token(issuer)})]:
            status, headers, body = await call(gw, path, method="POST", **kw)
            assert status == 400, body
            assert_error_body(body, body["error"], "token-in-query")
            assert challenge_params(headers["WWW-Authenticate"])["error"] == "invalid_request"
        assert upstream.requests == []


async def test_mcp_refuses_a_foreign_origin(tmp_path, issuer, upstream):
    async with mcp_gateway(tmp_path, issuer, upstream) as gw:
        assert_denied(await call(gw, "/mcp", method="POST", token=mcp_token(issuer),
                                 headers={"Origin": "https://evil.example"}), "origin-not-allowed", upstream)
        await expect(gw, upstream, "/mcp", 200, method="POST", token=mcp_token(issuer), headers={"Origin": APP})
        await expect(gw, upstream, "/mcp", 200, method="POST", token=mcp_token(issuer), headers={"Origin": PUBLIC})


# --- metrics --------------------------------------------------------------------------------------

async def test_policy_metrics(tmp_path, issuer, upstream):
    rule = {"action": "Allow", "principal": {"jwt": {"provider": "idp", "scopes": ["read"]}}}
    async with gateway(tmp_path, upstream, {**jwt_spec(issuer), **authorization([rule])}) as gw:
        await expect(gw, upstream, "/secret-path-123", 200, token=issuer.mint(claims(scope="read")))
        await call(gw, "/secret-path-123")
        await call(gw, "/secret-path-123", token=issuer.mint(claims(scope="other")))
        decisions = "sandgate_policy_decisions_total"
        assert await metric_value(gw, decisions, policy="infra/p", decision="allow") == 1
        assert await metric_value(gw, decisions, policy="infra/p", decision="deny", reason="credentials-missing") == 1
        assert await metric_value(gw, decisions, policy="infra/p", decision="deny", reason="insufficient-scope") == 1
        assert await metric_value(gw, "sandgate_jwks_refresh_total", provider="idp", result="success") >= 1
        samples = await metric_samples(gw)
        assert not any("secret-path" in v or "user-1" in v for s in samples for v in s.labels.values())
