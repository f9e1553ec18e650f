"""Names and URLs of the dev stack: the cluster addresses it stands in for, and the tour.

The service names are the backends the shipped routes.yaml points at (Service NAME in namespace
`platform`, cluster domain `cluster.local`); `sandgate dev` overrides each with a loopback port.
The demo sandbox is found the way a cluster's are, from the Kubernetes API stand-in.
"""

from __future__ import annotations

import json
import shlex

from yarl import URL

API_SERVICE = "api.platform.svc.cluster.local:8000"
MCP_SERVICE = "mcp.platform.svc.cluster.local:8000"
FRONTEND_SERVICE = "frontend.platform.svc.cluster.local:3000"

# The scope the dev policy requires on /mcp, the API stand-in grants by default, and the MCP
# metadata advertises: one name, so the three cannot drift apart.
MCP_SCOPE = "mcp:tools"

# The scope the sandbox and preview routes require, with the platform's own audience (the public
# origin, see platform_audience): tokens issued to third-party MCP clients (audience the MCP
# URL, scope mcp:tools) never open terminals, reach sandbox ports or create previews.
SANDBOX_SCOPE = "sandboxes"

# The sandbox the Kubernetes API stand-in lists (gateway/devstack/cluster.py): its namespace is
# the one the shipped SandboxRouter opens. And what the tour says to it.
SANDBOX_NAMESPACE = "sandboxes"
SANDBOX_NAME = "demo"
_CHAT = '{"message":"hello"}'

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


def platform_audience(public_url: str) -> str:
    """The audience of the platform's own API tokens: its public origin. An MCP token's is the
    MCP URL (`{origin}/mcp`), so the two never pass for each other."""
    return public_origin(public_url)


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


def _connect_to(origin: str) -> str:
    """curl's `--connect-to` value sending any host to the gateway: a preview's host name is
    then only the Host header (and TLS name), never looked up in DNS."""
    url = URL(origin)
    host = f"[{url.host}]" if ":" in (url.host or "") else url.host
    return f"::{host}:{url.port}"


def _take(field: str) -> str:
    """A pipe stage printing one field of a JSON object read from stdin."""
    return f"python3 -c 'import json,sys;print(json.load(sys.stdin)[\"{field}\"])'"


def try_commands(public_url: str, sandbox_port: int) -> list[str]:
    """The shell commands `sandgate dev` prints: `curl` for each of `try_urls` (the last, /mcp
    without a token, is the 401 pointing at the metadata), then an MCP token from the API
    stand-in and the same MCP endpoint called with it, then a platform token (scope
    `sandboxes`, audience the platform) with which the demo sandbox (listening on
    `sandbox_port`) is reached by `X-Sandbox-*` headers and through the port proxy, and a
    preview of that port is created, then reached by its URL without any token."""
    origin = public_origin(public_url)
    namespace, name = SANDBOX_NAMESPACE, SANDBOX_NAME
    bearer = '-H "Authorization: Bearer $TOKEN"'
    platform = '-H "Authorization: Bearer $SANDBOX_TOKEN"'
    json_body = "-H 'Content-Type: application/json' -d"
    chat = f"{json_body} {shlex.quote(_CHAT)}"
    preview = json.dumps({"namespace": namespace, "sandbox": name, "port": sandbox_port}, separators=(",", ":"))
    return [f"curl -i {shlex.quote(url)}" for url in try_urls(origin)] + [
        f"TOKEN=$(curl -s -X POST -d grant_type=client_credentials {origin}/oauth/token | {_take('access_token')})",
        f"curl -i {bearer} "
        "-H 'Accept: application/json, text/event-stream' -H 'Content-Type: application/json' "
        f"-d {shlex.quote(_INITIALIZE)} {origin}/mcp",
        f"SANDBOX_TOKEN=$(curl -s -X POST -d grant_type=client_credentials -d scope={SANDBOX_SCOPE} "
        f"{origin}/oauth/token | {_take('access_token')})",
        f"curl -i {platform} -H 'X-Sandbox-ID: {name}' -H 'X-Sandbox-Port: {sandbox_port}' {chat} {origin}/chat",
        f"curl -i {platform} {chat} {origin}/gateway/v1/sandboxes/{namespace}/{name}/ports/{sandbox_port}/chat",
        f"PREVIEW=$(curl -s {platform} {json_body} {shlex.quote(preview)} {origin}/gateway/v1/previews | {_take('url')})",
        f'curl -i --connect-to {_connect_to(origin)} {chat} "${{PREVIEW}}chat"',
    ]
