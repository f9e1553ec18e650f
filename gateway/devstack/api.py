"""Stand-in for the platform API (Service `api.platform:8000`).

- `/api...`, `/auth...`, `/oauth...`: answer with JSON describing the request exactly as it
  arrived (method, raw path, query, headers in order with repeats, a digest of the body, the
  peer) so a developer can see what the gateway forwarded.
- `/.well-known/oauth-authorization-server[/mcp]` (RFC 8414) and
  `/.well-known/openid-configuration[/mcp]` (OIDC discovery): metadata whose issuer is the
  public origin. The `/mcp` forms answer with the same document: clients that treat the MCP URL
  as the authorization server's URL probe them, and the seed platform served them this way.
- `POST /oauth/token`: a real issuer for the `client_credentials` grant (RFC 6749 §4.4): an
  RS256 JWT access token (RFC 9068 shape) for subject `dev-user`, scope `mcp:tools` unless
  `scope` asks for others it supports, valid for an hour. Its audience is the RFC 8707
  `resource` parameter; without one, the platform's own audience (the public origin) when the
  `sandboxes` scope is asked for, else the public MCP URL. So `-d scope=sandboxes` gives the
  token the sandbox and preview routes accept, and the default is an MCP client's token, which
  they refuse. The other grants in the metadata are not implemented.
- `/oauth/jwks`: the public half of the signing key (RSA 2048, kid `dev-1`), generated when the
  app is made, so every run has a fresh key and nothing secret is ever written to disk.
- `/api/events`: Server-Sent Events, one every 0.5 s (`?count=N`, 1..100, default 5).
- `/api/ws`: WebSocket echo (text and binary); the first offered subprotocol is accepted; the
  text message `close CODE` makes the server close with CODE (1000 or 3000-4999).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
import weakref

import jwt as pyjwt
from aiohttp import WSCloseCode, WSMsgType, web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from yarl import URL

from gateway.devstack.urls import MCP_SCOPE, SANDBOX_SCOPE, platform_audience, public_origin

ISSUER = web.AppKey("issuer", str)
SIGNING_KEY = web.AppKey("signing_key", rsa.RSAPrivateKey)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)

KEY_ID = "dev-1"
TOKEN_LIFETIME = 3600
SUBJECT = "dev-user"
DEFAULT_CLIENT_ID = "sandgate-dev"
SCOPES_SUPPORTED = ("openid", "profile", "email", "offline_access", MCP_SCOPE, SANDBOX_SCOPE)
# RFC 6749 §5.1: token responses (and their errors) must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

EVENT_INTERVAL = 0.5
MAX_EVENTS = 100


def authorization_server_metadata(issuer: str) -> dict:
    """RFC 8414 metadata for the platform's authorization server."""
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/oauth/authorize",
        "token_endpoint": f"{issuer}/oauth/token",
        "registration_endpoint": f"{issuer}/oauth/register",
        "revocation_endpoint": f"{issuer}/oauth/revoke",
        "jwks_uri": f"{issuer}/oauth/jwks",
        "scopes_supported": list(SCOPES_SUPPORTED),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
    }


def openid_configuration(issuer: str) -> dict:
    """OpenID Connect Discovery 1.0 metadata: the RFC 8414 document plus the OIDC-only fields."""
    return {
        **authorization_server_metadata(issuer),
        "userinfo_endpoint": f"{issuer}/oauth/userinfo",
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "name", "email"],
    }


async def echo(request: web.Request) -> web.Response:
    # The body is hashed as it streams in, so any size can be sent without buffering it.
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        digest.update(chunk)
        length += len(chunk)
    return web.json_response(
        {
            "service": "api",
            "method": request.method,
            "path": request.rel_url.raw_path,
            "query_string": request.rel_url.raw_query_string,
            "query": [[name, value] for name, value in request.query.items()],
            "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in request.raw_headers],
            "body": {"length": length, "sha256": digest.hexdigest()},
            "remote": request.remote,
        }
    )


async def as_metadata(request: web.Request) -> web.Response:
    return web.json_response(authorization_server_metadata(request.app[ISSUER]))


async def oidc_metadata(request: web.Request) -> web.Response:
    return web.json_response(openid_configuration(request.app[ISSUER]))


def public_jwks(key: rsa.RSAPrivateKey) -> dict:
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": KEY_ID, "use": "sig", "alg": "RS256"}]}


async def jwks(request: web.Request) -> web.Response:
    return web.json_response(public_jwks(request.app[SIGNING_KEY]), headers={"Cache-Control": "max-age=300"})


class _TokenError(Exception):
    """An RFC 6749 §5.2 error response: `error` code and a human description."""

    def __init__(self, error: str, description: str):
        super().__init__(description)
        self.error, self.description = error, description


def _single(form, name: str) -> str | None:
    values = form.getall(name, [])
    if len(values) > 1:  # RFC 6749 §3.2: parameters must not be repeated
        raise _TokenError("invalid_request", f"{name} must not be repeated")
    return values[0] if values else None


def _audience(form, public: str, scope: str) -> str | list[str]:
    resources = form.getall("resource", [])
    for resource in resources:  # RFC 8707 §2: an absolute URI without a fragment
        url = URL(resource)
        if not url.absolute or url.raw_fragment:
            raise _TokenError("invalid_target", f"resource must be an absolute URI without a fragment: {resource!r}")
    if not resources:
        return platform_audience(public) if SANDBOX_SCOPE in scope.split() else f"{public}/mcp"
    return resources[0] if len(resources) == 1 else resources


def _scope(form) -> str:
    requested = (_single(form, "scope") or "").split()
    unknown = [s for s in requested if s not in SCOPES_SUPPORTED]
    if unknown:
        raise _TokenError("invalid_scope", f"unsupported scope: {' '.join(unknown)}")
    return " ".join(dict.fromkeys(requested)) or MCP_SCOPE


def issue_token(form, issuer: str, key: rsa.RSAPrivateKey, subject: str = SUBJECT) -> dict:
    """The RFC 6749 §5.1 response for a client_credentials request, or raises _TokenError.

    The endpoint always issues for SUBJECT; `subject` lets Python callers (tests) mint the same
    token for someone else, with the key of a running stack (Devstack.signing_key)."""
    grant_type = _single(form, "grant_type")
    if grant_type is None:
        raise _TokenError("invalid_request", "grant_type is required")
    if grant_type != "client_credentials":
        raise _TokenError("unsupported_grant_type", "only grant_type=client_credentials is implemented here")
    scope = _scope(form)
    audience = _audience(form, issuer, scope)
    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "client_id": _single(form, "client_id") or DEFAULT_CLIENT_ID,
        "scope": scope,
        "iat": now,
        "exp": now + TOKEN_LIFETIME,
        "jti": uuid.uuid4().hex,
    }
    token = pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": KEY_ID, "typ": "at+jwt"})
    return {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME, "scope": scope}


async def token(request: web.Request) -> web.Response:
    # No client authentication: this is a local development issuer, and anyone who can reach
    # the loopback port may have a token. A real authorization server authenticates the client.
    if request.method != "POST":
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])
    form = await request.post()
    try:
        body = issue_token(form, request.app[ISSUER], request.app[SIGNING_KEY])
    except _TokenError as e:
        return web.json_response({"error": e.error, "error_description": e.description}, status=400, headers=NO_STORE)
    return web.json_response(body, headers=NO_STORE)


async def events(request: web.Request) -> web.StreamResponse:
    raw = request.query.get("count", "5")
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_EVENTS):
        return web.json_response(
            {"error": "bad_request", "message": f"count must be an integer from 1 to {MAX_EVENTS}"}, status=400
        )
    count = int(raw)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    try:
        for n in range(1, count + 1):
            data = json.dumps({"n": n, "of": count})
            await response.write(f"id: {n}\nevent: tick\ndata: {data}\n\n".encode())
            if n < count:
                await asyncio.sleep(EVENT_INTERVAL)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client (or the gateway, on the client's behalf) went away: an ordinary end
    return response


def _close_code(text: str) -> int | None:
    """The code of a `close CODE` command, when it is one a server may send."""
    _, _, raw = text.partition(" ")
    if not (raw.isascii() and raw.isdigit()):
        return None
    code = int(raw)
    return code if code == 1000 or 3000 <= code <= 4999 else None


async def websocket(request: web.Request) -> web.WebSocketResponse:
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    ws = web.WebSocketResponse(protocols=offered[:1])
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    async for message in ws:
        if message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
        elif message.type is WSMsgType.TEXT:
            if message.data.startswith("close "):
                code = _close_code(message.data)
                if code is None:
                    await ws.send_str("error: close code must be 1000 or 3000-4999")
                    continue
                await ws.close(code=code, message=b"closed on request")
                break
            await ws.send_str(message.data)
    return ws


async def close_websockets(app: web.Application) -> None:
    """on_shutdown: open WebSockets (kept in app[WEBSOCKETS]) end with 1001 Going Away."""
    for ws in set(app[WEBSOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def make_app(public_url: str) -> web.Application:
    app = web.Application()
    app[ISSUER] = public_origin(public_url)
    app[SIGNING_KEY] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    app[WEBSOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(close_websockets)
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/oauth-authorization-server/mcp"):
        app.router.add_get(path, as_metadata)
    for path in ("/.well-known/openid-configuration", "/.well-known/openid-configuration/mcp"):
        app.router.add_get(path, oidc_metadata)
    app.router.add_get("/oauth/jwks", jwks)
    app.router.add_route("*", "/oauth/token", token)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/ws", websocket)
    # `{tail:(/.*)?}` takes `/api` and `/api/...` but not `/apix`: prefixes are path elements.
    for prefix in ("/api", "/auth", "/oauth"):
        app.router.add_route("*", prefix + "{tail:(/.*)?}", echo)
    return app
