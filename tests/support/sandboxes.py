"""A small sandbox world for tests: the Kubernetes API double holding Sandboxes and
SandboxClaims, and real app servers standing in for sandbox pods, each on its own loopback
address (127.0.0.N), which is the "pod IP" the Sandbox's status reports.
"""

from __future__ import annotations

import hashlib
import itertools
from datetime import datetime, timezone

import yaml
from aiohttp import web

from tests.support.echo import make_echo_app

SANDBOX_API = "agents.x-k8s.io/v1beta1"
CLAIM_API = "extensions.agents.x-k8s.io/v1beta1"
_next_ip = itertools.count(20)


def pod_ip() -> str:
    """A fresh loopback address for one sandbox pod (Linux routes all of 127.0.0.0/8 to lo)."""
    n = next(_next_ip)
    return f"127.0.{n // 250}.{n % 250 + 2}"


def sandbox_object(namespace: str, name: str, *, labels: dict | None = None, annotations: dict | None = None,
                   owner_claim: dict | None = None) -> dict:
    metadata: dict = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    if owner_claim is not None:
        metadata["ownerReferences"] = [{
            "apiVersion": CLAIM_API, "kind": "SandboxClaim", "name": owner_claim["metadata"]["name"],
            "uid": owner_claim["metadata"]["uid"], "controller": True,
        }]
    return {
        "apiVersion": SANDBOX_API,
        "kind": "Sandbox",
        "metadata": metadata,
        "spec": {"podTemplate": {"metadata": {}, "spec": {"containers": [{"name": "agent", "image": "python:3.11"}]}}},
    }


def claim_object(namespace: str, name: str, *, labels: dict | None = None, annotations: dict | None = None) -> dict:
    metadata: dict = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": CLAIM_API, "kind": "SandboxClaim", "metadata": metadata, "spec": {"warmPoolRef": {"name": "python"}}}


def pod_selector(name: str) -> str:
    """The label selector agent-sandbox reports in status.selector: its pod's name hash."""
    return f"agents.x-k8s.io/sandbox-name-hash={hashlib.sha256(name.encode()).hexdigest()[:8]}"


def ready_status(ip: str | None, *, ready: bool = True, service_fqdn: str | None = None, selector: str | None = None) -> dict:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    status: dict = {"conditions": [{
        "type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now,
        "reason": "DependenciesReady" if ready else "PodNotReady",
        "message": "" if ready else "Pod is not ready",
    }]}
    if ip:
        status["podIPs"] = [ip]
    if service_fqdn:
        status["serviceFQDN"] = service_fqdn
    if selector:
        status["selector"] = selector
    return status


def pod_object(namespace: str, name: str, ip: str, *, sandbox: dict | None = None, labels: dict | None = None) -> dict:
    """A pod; with `sandbox`, as agent-sandbox makes it: owned by the Sandbox (by uid) and
    labelled with the Sandbox's name hash (its status.selector)."""
    metadata: dict = {"name": name, "namespace": namespace}
    if sandbox is not None:
        sandbox_name = sandbox["metadata"]["name"]
        metadata["ownerReferences"] = [{"apiVersion": SANDBOX_API, "kind": "Sandbox", "name": sandbox_name,
                                        "uid": sandbox["metadata"]["uid"], "controller": True}]
        labels = {**dict([pod_selector(sandbox_name).split("=", 1)]), **(labels or {})}
    if labels:
        metadata["labels"] = labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"containers": [{"name": "agent", "image": "python:3.11"}]}}


class SandboxWorld:
    """Sandboxes in the API double, each with a real app on its own pod IP."""

    def __init__(self, api, aiohttp_server):
        self.api = api
        self._server = aiohttp_server
        self.apps: dict[tuple[str, str], object] = {}  # (namespace, name) -> TestServer
        self.received: list[tuple[str, str, str, dict]] = []  # (sandbox, method, raw path, headers)

    async def add(self, namespace: str, name: str, *, owner: str | None = None, shared_with: str | None = None,
                  ready: bool = True, via_claim: bool = True, app: web.Application | None = None,
                  with_pod: bool = False) -> tuple[str, int]:
        """A Sandbox (owned through a SandboxClaim by default) and its app; returns (ip, port)."""
        ip = pod_ip()
        app = app or make_echo_app(f"{namespace}/{name}")

        @web.middleware
        async def record(request: web.Request, handler):
            self.received.append((f"{namespace}/{name}", request.method, request.raw_path, dict(request.headers)))
            return await handler(request)

        app.middlewares.append(record)
        server = await self._server(app, host=ip)
        self.apps[(namespace, name)] = server
        annotations = {"sandgate.dev/owner": owner} if owner else {}
        if shared_with:
            annotations["sandgate.dev/shared-with"] = shared_with
        claim = None
        if via_claim:
            claim = self.api.create(claim_object(namespace, name, annotations=annotations))
            created = self.api.create(sandbox_object(namespace, name, owner_claim=claim))
        else:
            created = self.api.create(sandbox_object(namespace, name, annotations=annotations))
        self.api.set_status(SANDBOX_API, "Sandbox", namespace, name, ready_status(ip, ready=ready, selector=pod_selector(name)))
        if with_pod:
            self.api.create(pod_object(namespace, name, ip, sandbox=created))
            self.api.set_status("v1", "Pod", namespace, name, {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]})
        return ip, server.port


def router_yaml(*, namespace: str = "platform", allowed: list[str] | None = None, resolution: str = "Cluster",
                token_file: str | None = None, allow_unauthenticated: bool = False, timeout: str | None = None,
                default_port: int | None = None, cluster_domain: str | None = None) -> str:
    spec: dict = {"resolution": resolution, "allowedNamespaces": allowed or ["agents"], "defaultNamespace": (allowed or ["agents"])[0]}
    if token_file:
        spec["routerTokenFile"] = token_file
    if allow_unauthenticated:
        spec["allowUnauthenticated"] = True
    if timeout:
        spec["timeout"] = timeout
    if default_port:
        spec["defaultPort"] = default_port
    if cluster_domain:
        spec["clusterDomain"] = cluster_domain
    router = {"apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxRouter",
              "metadata": {"name": "sandboxes", "namespace": namespace}, "spec": spec}
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: {namespace}}}
spec:
  gatewayClassName: sandgate
  listeners: [{{name: http, port: 8080, protocol: HTTP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: sandboxes, namespace: {namespace}}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - name: header-routed
    matches:
    - headers: [{{name: X-Sandbox-ID, type: RegularExpression, value: ".*"}}]
    backendRefs: [{{group: sandgate.dev, kind: SandboxRouter, name: sandboxes}}]
  - name: sandbox-api
    matches:
    - path: {{type: PathPrefix, value: /gateway/v1/sandboxes}}
    backendRefs: [{{group: sandgate.dev, kind: SandboxRouter, name: sandboxes}}]
---
{yaml.safe_dump(router, sort_keys=False)}"""
