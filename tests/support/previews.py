"""Routes and policies for preview tests: the SandboxRouter (its namespaces are where previews
live), the preview API on the platform host and the zone's wildcard host, JWT on the API."""

from __future__ import annotations

import json

import aiohttp
import yaml

from gateway.server.handler import Settings
from tests.support.harness import running_gateway, url
from tests.support.issuer import claims
from tests.support.policy_harness import provider, route_target, security_policy
from tests.support.sandboxes import router_yaml

ZONE = "apps.example.test"
LOOPBACK = Settings(allow_loopback_sandboxes=True)  # the sandbox apps listen on loopback


def preview_routes(*, idle_ttl: str = "30m", max_lifetime: str = "8h", access_mode: str = "capability",
                   approval_window: str = "5m") -> str:
    zone = {
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "PreviewZone",
        "metadata": {"name": "previews", "namespace": "platform"},
        "spec": {"zone": ZONE, "gatewayRef": {"name": "gw", "namespace": "platform"}, "accessMode": access_mode,
                 "idleTTL": idle_ttl, "maxLifetime": max_lifetime, "approvalWindow": approval_window},
    }
    return router_yaml(allow_unauthenticated=False) + f"""\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: preview-api, namespace: platform}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - matches:
    - path: {{type: PathPrefix, value: /gateway/v1/previews}}
    - path: {{type: PathPrefix, value: /gateway/v1/approvals}}
    backendRefs: [{{group: sandgate.dev, kind: PreviewZone, name: previews}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: preview-hosts, namespace: platform}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: ["*.{ZONE}"]
  rules:
  - backendRefs: [{{group: sandgate.dev, kind: PreviewZone, name: previews}}]
---
{yaml.safe_dump(zone, sort_keys=False)}"""


def preview_policies(issuer, *, approval: str = "auto", max_per_sandbox: int | None = None,
                     max_total: int | None = None, ports: tuple[int, int] | None = None, **preview_fields) -> str:
    """`preview_fields`: more SandboxPolicy `spec.preview` fields, by their CRD names (maxPerOwner...)."""
    jwt = {"jwt": {"providers": [provider(issuer)]}}
    out = security_policy("sandbox-jwt", jwt, targets=[route_target("sandboxes"), route_target("preview-api")],
                          namespace="platform")
    preview: dict = {"approval": approval}
    if max_per_sandbox is not None:
        preview["maxPerSandbox"] = max_per_sandbox
    if max_total is not None:
        preview["maxTotal"] = max_total
    if ports is not None:
        preview["ports"] = {"min": ports[0], "max": ports[1]}
    preview.update(preview_fields)
    sandbox_policy = {
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPolicy",
        "metadata": {"name": "who", "namespace": "platform"},
        "spec": {"targetRefs": [route_target("sandboxes"), route_target("preview-api"), route_target("preview-hosts")],
                 "owner": {"annotation": "sandgate.dev/owner"}, "adminGroups": ["platform-admins"], "preview": preview},
    }
    return out + "---\n" + yaml.safe_dump(sandbox_policy, sort_keys=False)


async def api(gw, method: str, path: str, token: str | None, body: dict | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url(gw, path), headers=headers,
                                   data=json.dumps(body) if body is not None else None) as response:
            raw = await response.read()
            return response.status, json.loads(raw) if raw and response.content_type == "application/json" else None


async def via_host(gw, host: str, path: str = "/", *, headers: dict | None = None, method: str = "GET"):
    """A request to the gateway for `host` (the preview's DNS name points at the gateway)."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url(gw, path), headers={"Host": host, **(headers or {})}) as response:
            raw = await response.read()
            body = json.loads(raw) if raw and response.content_type == "application/json" else raw
            return response.status, response.headers, body


def host_of(created: dict) -> str:
    return created["url"].split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]


def token_for(issuer, sub: str = "alice@example.com", groups=()) -> str:
    return issuer.mint(claims(sub=sub, groups=list(groups)))


def preview_gateway(tmp_path, world, issuer, *, routes: str | None = None, timing: dict | None = None,
                    database_url: str | None = None, audit=None, overrides=None, **policy):
    """A gateway serving `preview_routes()` (or `routes`) with `preview_policies(issuer, **policy)`
    against the world's Kubernetes API double."""
    return running_gateway(tmp_path, routes or preview_routes(), settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                           policies_yaml=preview_policies(issuer, **policy), preview_timing=timing,
                           database_url=database_url, audit=audit, overrides=overrides)
