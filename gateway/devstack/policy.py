"""The policies `sandgate dev` writes: the policy layer, shown working on the MCP route, the
sandbox route and the preview API.

MCP: JWTs from the platform's issuer (the API stand-in locally), audience = the public MCP URL,
scope `mcp:tools` required, browsers only from the public origin. It targets the `mcp` rule of
HTTPRoute platform/mcp alone, so `/mcp/health` stays public and the RFC 9728 metadata (which the
gateway serves itself) needs no token. policies/examples/platform.yaml is this same object for
a cluster.

Sandboxes and previews: a JWT from the same issuer for the platform's own audience (the public
origin) with scope `sandboxes`, on HTTPRoutes platform/sandboxes and platform/previews (the
preview API), and a SandboxPolicy that lets its subject reach, and open previews of, the
sandboxes whose claim names it as owner (or that are shared with it; group platform-admins
reaches all). A token issued to an MCP client (audience the MCP URL, scope mcp:tools) gets
nothing there. policies/sandboxes.yaml is the same two objects for a cluster. Tests keep each
dev policy equal to its shipped counterpart.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway.devstack.urls import MCP_SCOPE, SANDBOX_SCOPE, platform_audience, public_origin

POLICY_FILE = "mcp.yaml"
SANDBOX_POLICY_FILE = "sandboxes.yaml"
PROVIDER = "platform"
OWNER_ANNOTATION = "sandgate.dev/owner"  # on the SandboxClaim: the owner's JWT subject
ADMIN_GROUP = "platform-admins"


def mcp_security_policy(public_url: str, jwks_uri: str) -> dict:
    """The SecurityPolicy object; `jwks_uri` is where the gateway itself fetches the issuer's keys."""
    origin = public_origin(public_url)
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "SecurityPolicy",
        "metadata": {"name": "mcp", "namespace": "platform"},
        "spec": {
            "targetRefs": [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "mcp", "sectionName": "mcp"}
            ],
            "jwt": {
                "providers": [
                    {
                        "name": PROVIDER,
                        "issuer": origin,
                        "audiences": [f"{origin}/mcp"],
                        "remoteJWKS": {"uri": jwks_uri, "cacheDuration": "5m"},
                    }
                ]
            },
            "authorization": {
                "defaultAction": "Deny",
                "rules": [
                    {
                        "name": "mcp-tools-scope",
                        "action": "Allow",
                        "principal": {"jwt": {"provider": PROVIDER, "scopes": [MCP_SCOPE]}},
                    }
                ],
            },
            "cors": {
                "allowOrigins": [origin],
                "allowMethods": ["GET", "POST", "DELETE"],
                "allowHeaders": ["Authorization", "Content-Type", "Mcp-Session-Id", "Mcp-Protocol-Version", "Last-Event-Id"],
                "exposeHeaders": ["Mcp-Session-Id", "WWW-Authenticate"],
            },
        },
    }


def sandbox_policies(public_url: str, jwks_uri: str) -> list[dict]:
    """The SecurityPolicy of HTTPRoutes platform/sandboxes and platform/previews (the preview
    API), and the SandboxPolicy of those two and platform/preview-hosts.

    Tokens must be the platform's own: audience the public origin and scope `sandboxes`
    (no token: 401; another audience, e.g. an MCP client's: 401; no `sandboxes` scope: 403).
    Who reaches which sandbox, and opens its previews, is then decided by the SandboxPolicy
    from the subject. The preview hosts take no JWT: their token is the capability."""
    def routes(*names: str) -> list[dict]:
        return [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": name} for name in names]

    security = {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "SecurityPolicy",
        "metadata": {"name": "sandboxes", "namespace": "platform"},
        "spec": {
            "targetRefs": routes("sandboxes", "previews"),
            "jwt": {
                "providers": [
                    {
                        "name": PROVIDER,
                        "issuer": public_origin(public_url),
                        "audiences": [platform_audience(public_url)],
                        "remoteJWKS": {"uri": jwks_uri, "cacheDuration": "5m"},
                    }
                ]
            },
            "authorization": {
                "defaultAction": "Deny",
                "rules": [
                    {
                        "name": "sandboxes-scope",
                        "action": "Allow",
                        "principal": {"jwt": {"provider": PROVIDER, "scopes": [SANDBOX_SCOPE]}},
                    }
                ],
            },
        },
    }
    sandbox = {
        "apiVersion": "sandgate.dev/v1alpha1",
        "kind": "SandboxPolicy",
        "metadata": {"name": "sandboxes", "namespace": "platform"},
        "spec": {
            "targetRefs": routes("sandboxes", "previews", "preview-hosts"),
            "owner": {"annotation": OWNER_ANNOTATION},
            "adminGroups": [ADMIN_GROUP],
            "preview": {"maxPerSandbox": 10, "maxTotal": 1000},
        },
    }
    return [security, sandbox]


def write_policies(directory: str | Path, public_url: str, jwks_uri: str) -> list[Path]:
    """Write the policies as the only files of `directory` (what `--policies` would point at)."""
    header = "# Written by `sandgate dev` for this run; removed when it stops.\n"
    mcp = Path(directory) / POLICY_FILE
    mcp.write_text(header + yaml.safe_dump(mcp_security_policy(public_url, jwks_uri), sort_keys=False))
    sandboxes = Path(directory) / SANDBOX_POLICY_FILE
    sandboxes.write_text(header + yaml.safe_dump_all(sandbox_policies(public_url, jwks_uri), sort_keys=False))
    return [mcp, sandboxes]
