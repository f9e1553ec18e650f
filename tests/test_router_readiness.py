"""/readyz with SandboxRouters (SPEC §4.1, §6): a `DNS` SandboxRouter needs no Kubernetes API, as
the agent-sandbox router itself is deployed; `Cluster` resolution and SandboxPolicy relations
(a SecurityPolicy on the rule) wait for the cluster watch."""

from __future__ import annotations

import aiohttp

from tests.support.fixtures import issuer, upstream_port  # noqa: F401 - fixtures
from gateway.server.handler import Settings
from tests.support.harness import running_gateway, url
from tests.support.policy_harness import provider, readiness, route_target, security_policy, wait_for, wait_ready
from tests.support.sandboxes import router_yaml


def dns_router(port: int) -> str:
    return router_yaml(resolution="DNS", allow_unauthenticated=True, default_port=port)


def dns_gateway(tmp_path, port: int, **kwargs):
    """Only a DNS SandboxRouter, and no Kubernetes API anywhere (the kubeconfig does not exist);
    the name resolves to loopback, which the address filter lets through only in local runs."""
    kwargs.setdefault("settings", Settings(allow_loopback_sandboxes=True))
    return running_gateway(tmp_path, dns_router(port), kubeconfig=tmp_path / "no-such-kubeconfig",
                           overrides={f"box-1.agents.svc.cluster.local:{port}": ("127.0.0.1", port)}, **kwargs)


async def test_a_dns_router_without_kubernetes_is_ready_and_proxies(tmp_path, upstream_port):
    async with dns_gateway(tmp_path, upstream_port) as gw:
        ready = await wait_ready(gw)
        status, details = await readiness(gw)
        async with aiohttp.ClientSession() as session:
            async with session.get(url(gw, "/hello"), headers={"X-Sandbox-ID": "box-1"}) as r:
                proxied = r.status, await r.json()
    assert ready and status == 200, details
    # the operator still sees that there is no API, and that it is not waited for
    assert details["kubernetes"] == "unavailable" and details["kubernetes_needed"] is False
    assert proxied[0] == 200 and proxied[1]["path"] == "/hello"


async def test_a_dns_router_behind_a_security_policy_waits_for_the_cluster(tmp_path, upstream_port, issuer):
    """Callers' relations to a sandbox (owner, shared, admin) are read from the watched state."""
    jwt = security_policy("sandbox-jwt", {"jwt": {"providers": [provider(issuer)]}},
                          targets=[route_target("sandboxes")], namespace="platform")
    async with dns_gateway(tmp_path, upstream_port, policies_yaml=jwt) as gw:

        async def keys_loaded():
            return (await readiness(gw))[1].get("jwks_loaded") is True

        assert await wait_for(keys_loaded)
        status, details = await readiness(gw)
    assert status == 503 and details["kubernetes"] == "unavailable" and details["kubernetes_needed"] is True


async def test_a_reload_to_cluster_resolution_makes_readiness_wait_and_back(tmp_path, upstream_port):
    async with dns_gateway(tmp_path, upstream_port) as gw:
        assert await wait_ready(gw)
        routes = tmp_path / "routes.yaml"
        routes.write_text(router_yaml(resolution="Cluster", allow_unauthenticated=True, default_port=upstream_port))
        assert gw.reload()
        cluster = await readiness(gw)
        routes.write_text(dns_router(upstream_port))
        assert gw.reload()
        dns = await readiness(gw)
    assert cluster[0] == 503 and cluster[1]["kubernetes_needed"] is True
    assert dns[0] == 200 and dns[1]["kubernetes_needed"] is False
