"""Names and URLs of the dev stack: the cluster addresses it stands in for, and the tour.

The service names are the backends the shipped routes.yaml points at (Service NAME in namespace
`platform`, cluster domain `cluster.local`); `sandgate dev` overrides each with a loopback port.
"""

from __future__ import annotations

import shlex

from yarl import URL

API_SERVICE = "api.platform.svc.cluster.local:8000"
MCP_SERVICE = "mcp.platform.svc.cluster.local:8000"
FRONTEND_SERVICE = "frontend.platform.svc.cluster.local:3000"

# The scope the dev policy requires on /mcp, the API stand-in grants by default, and the MCP
# metadata advertises: one name, so the three cannot drift apart.
MCP_SCOPE = "mcp:tools"

# The first request of an MCP session, small enough to paste.
_INITIALIZE = (
    '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
    '"capabilities":{},"clientInfo":{"name":"curl","version":"0"}}}'
)


def public_origin(public_url: str) -> str:
    """`scheme://host[:port]` of the public URL, without a trailing slash.

    Issuers and resource URLs are compared as exact strings by OAuth clients, so every stand-in
    derives them from this one normalised form.
    """
    url = URL(public_url)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"public URL must be an http(s) origin, got {public_url!r}")
    if url.raw_path not in ("", "/") or url.raw_query_string or url.raw_fragment or url.raw_user:
        raise ValueError(f"public URL must be an origin without path, query or user, got {public_url!r}")
    return str(url.origin())


def try_urls(public_url: str) -> list[str]:
    """The URLs a newcomer should curl once `sandgate dev` is up, one per stand-in feature."""
    origin = public_origin(public_url)
    return [
        f"{origin}/",
        f"{origin}/api/hello?name=sandgate",
        f"{origin}/api/events",
        f"{origin}/.well-known/oauth-authorization-server",
        f"{origin}/.well-known/openid-configuration",
        f"{origin}/.well-known/oauth-protected-resource/mcp",
        f"{origin}/mcp/health",
        f"{origin}/mcp",
    ]


def try_commands(public_url: str) -> list[str]:
    """The shell commands `sandgate dev` prints: `curl` for each of `try_urls` (the last, /mcp
    without a token, is the 401 pointing at the metadata), then a token from the API stand-in
    and the same MCP endpoint called with it."""
    origin = public_origin(public_url)
    take_token = "python3 -c 'import json,sys;print(json.load(sys.stdin)[\"access_token\"])'"
    return [f"curl -i {shlex.quote(url)}" for url in try_urls(origin)] + [
        f"TOKEN=$(curl -s -X POST -d grant_type=client_credentials {origin}/oauth/token | {take_token})",
        f'curl -i -H "Authorization: Bearer $TOKEN" '
        "-H 'Accept: application/json, text/event-stream' -H 'Content-Type: application/json' "
        f"-d {shlex.quote(_INITIALIZE)} {origin}/mcp",
    ]
