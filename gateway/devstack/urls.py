"""Names and URLs of the dev stack: the cluster addresses it stands in for, and the tour.

The service names are the backends the shipped routes.yaml points at (Service NAME in namespace
`platform`, cluster domain `cluster.local`); `sandgate dev` overrides each with a loopback port.
"""

from __future__ import annotations

from yarl import URL

API_SERVICE = "api.platform.svc.cluster.local:8000"
MCP_SERVICE = "mcp.platform.svc.cluster.local:8000"
FRONTEND_SERVICE = "frontend.platform.svc.cluster.local:3000"


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
