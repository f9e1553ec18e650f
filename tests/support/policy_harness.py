"""SecurityPolicy YAML builders, admin-endpoint probes and the shapes refusals must have, for
tests that run a gateway with policies (tests.support.harness.running_gateway(policies_yaml=...)).
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import admin_url, url
from tests.support.issuer import AUDIENCE, ISSUER


def security_policy(name: str, spec: dict, *, targets: list[dict] | None = None, namespace: str = "infra",
                    created: str | None = None) -> str:
    """A SecurityPolicy document; `targets` default to the HTTPRoute `echo`."""
    metadata = {"name": name, "namespace": namespace}
    if created:
        metadata["creationTimestamp"] = created
    refs = targets if targets is not None else [route_target("echo")]
    obj = {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "SecurityPolicy", "metadata": metadata,
           "spec": {"targetRefs": refs, **spec}}
    return "---\n" + yaml.safe_dump(obj, sort_keys=False)


def prefix_route(name: str, prefix: str, backend_name: str = "echo", namespace: str = "infra") -> str:
    """An HTTPRoute on `gw` sending PathPrefix `prefix` to one Backend."""
    return f"""\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: {backend_name}}}]
"""


def route_target(name: str, section: str | None = None) -> dict:
    ref = {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": name}
    if section:
        ref["sectionName"] = section
    return ref


def gateway_target(name: str = "gw") -> dict:
    return {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name}


def provider(issuer, *, name: str = "idp", audiences: list[str] | None = None, **extra) -> dict:
    """A jwt provider for tests.support.issuer.Issuer `issuer`; `extra` adds CRD fields."""
    out = {"name": name, "issuer": ISSUER, "audiences": audiences if audiences is not None else [AUDIENCE],
           "remoteJWKS": {"uri": issuer.jwks_uri}}
    out.update(extra)
    return out


async def metric_samples(running) -> list:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url(running, "/metrics")) as response:
            text = await response.text()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


async def metric_value(running, name: str, **labels: str) -> float:
    return sum(s.value for s in await metric_samples(running)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll an async predicate until true or timeout; returns its last answer."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        if await predicate():
            return True
        if loop.time() >= end:
            return False
        await asyncio.sleep(interval)


async def readiness(running) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url(running, "/readyz")) as response:
            return response.status, await response.json()


async def wait_ready(running, timeout: float = 5.0) -> bool:
    async def ready():
        return (await readiness(running))[0] == 200

    return await wait_for(ready, timeout)


# --- requests and what refusals must look like ------------------------------------------------

async def call(running, path: str = "/", *, method: str = "GET", token: str | None = None,
               headers: dict | None = None, session: aiohttp.ClientSession | None = None):
    """(status, headers, JSON body or None) of one request to the gateway."""
    out = dict(headers or {})
    if token is not None:
        out["Authorization"] = f"Bearer {token}"
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.request(method, url(running, path), headers=out) as response:
            body = await response.read()
            data = json.loads(body) if response.content_type == "application/json" and body else None
            return response.status, response.headers, data
    finally:
        if own:
            await session.close()


# RFC 6750 §3 / RFC 9110 §11: a Bearer auth-param list; error_description may only use
# %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash, no raw non-ASCII).
_PARAM = r'[A-Za-z_]+="[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_CHALLENGE = re.compile(rf"Bearer {_PARAM}(, {_PARAM})*")


def challenge_params(value: str) -> dict[str, str]:
    assert _CHALLENGE.fullmatch(value), f"malformed WWW-Authenticate: {value!r}"
    pairs = re.findall(r'([A-Za-z_]+)="([^"]*)"', value)
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), f"repeated parameter in {value!r}"
    return dict(pairs)


def assert_error_body(body, status_code: str, code: str) -> None:
    """SPEC §3.3: {"error", "message", "request_id", "violations": [{"code", "message"}]}."""
    assert body is not None and {"error", "message", "request_id", "violations"} <= body.keys(), body
    assert body["error"] == status_code, body
    assert body["violations"][0]["code"] == code, body
    assert {"code", "message"} <= body["violations"][0].keys()


def assert_refused(result, code: str, upstream) -> None:
    """A token was sent and refused: 401, `invalid_token`, never forwarded."""
    status, headers, body = result
    assert status == 401, (status, body)
    challenge = headers.get("WWW-Authenticate", "")
    assert challenge.startswith('Bearer realm="sandgate", error="invalid_token"'), challenge
    params = challenge_params(challenge)
    assert params["realm"] == "sandgate" and params["error"] == "invalid_token"
    assert body is not None and body["violations"][0]["code"] == code, body
    assert {"error", "message", "request_id"} <= body.keys()
    assert upstream.requests == [], "a refused request reached the upstream"


def assert_missing(result, upstream) -> None:
    """No credentials were found: 401 without an error code (RFC 6750 §3.1), never forwarded."""
    status, headers, body = result
    assert status == 401, (status, body)
    assert challenge_params(headers["WWW-Authenticate"]) == {"realm": "sandgate"}
    assert body["violations"][0]["code"] == "credentials-missing", body
    assert upstream.requests == []


def assert_denied(result, code: str, upstream) -> None:
    """Authenticated (or anonymous where allowed) but denied: 403 policy_violation, never forwarded."""
    status, _, body = result
    assert status == 403, (status, body)
    assert_error_body(body, "policy_violation", code)
    assert upstream.requests == []
