"""The SecurityPolicy `sandgate dev` puts on the MCP route: the policy layer, shown working.

JWTs from the platform's issuer (the API stand-in locally), audience = the public MCP URL,
scope `mcp:tools` required, browsers only from the public origin. It targets the `mcp` rule of
HTTPRoute platform/mcp alone, so `/mcp/health` stays public and the RFC 9728 metadata (which the
gateway serves itself) needs no token. policies/examples/platform.yaml is this same object for
a cluster; a test keeps the two equal.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway.devstack.urls import MCP_SCOPE, public_origin

POLICY_FILE = "mcp.yaml"
PROVIDER = "platform"


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


def write_policies(directory: str | Path, public_url: str, jwks_uri: str) -> Path:
    """Write the policy as the only file of `directory` (what `--policies` would point at)."""
    path = Path(directory) / POLICY_FILE
    header = "# Written by `sandgate dev` for this run; removed when it stops.\n"
    path.write_text(header + yaml.safe_dump(mcp_security_policy(public_url, jwks_uri), sort_keys=False))
    return path
