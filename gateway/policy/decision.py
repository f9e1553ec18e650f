"""One SecurityPolicy decision for one request: credentials, then authorization (SPEC §2.2, §3.4).

The result is a Decision with stable kebab-case reasons: they pick the status (401 vs 403),
land in the error body and the audit record. Nothing here touches sockets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Mapping, NamedTuple
from urllib.parse import parse_qsl

from gateway.auth.apikeys import ApiKeyPrincipal, ApiKeyVerifier
from gateway.auth.jwt import API_KEY_PROVIDER, JwtVerifier, TokenError, VerifiedToken, claim_headers
from gateway.policy import authz
from gateway.policy.model import ApiKeyAuth, JwtProvider, SecurityPolicy

_MESSAGES = {
    "credentials-missing": "This route requires a bearer token.",
    "token-in-query": "Tokens are not accepted in the query string.",
    "authorization-rule-denied": "An authorization rule denies this request.",
    "authorization-default-deny": "No authorization rule allows this request.",
    "insufficient-scope": "The token lacks a scope this request needs.",
}


@dataclass(frozen=True, slots=True)
class Violation:
    code: str
    message: str

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


# Decision and RequestFacts are made per request: immutable tuples are cheaper to make than
# frozen dataclasses.
class Decision(NamedTuple):
    allowed: bool
    status: int  # 200 when allowed, else 401 / 403 / 400
    reasons: tuple[Violation, ...]
    policy: SecurityPolicy
    token: VerifiedToken | None = None
    token_sent: bool = False
    required_scopes: tuple[str, ...] = ()
    upstream_headers: tuple[tuple[str, str], ...] = ()  # claimToHeaders

    @property
    def principal(self) -> str | None:
        """"ISSUER#SUBJECT" of the verified caller (VerifiedToken.principal)."""
        return None if self.token is None else self.token.principal


class RequestFacts(NamedTuple):
    method: str
    path: str
    raw_query: str
    headers: Mapping[str, str]  # case-insensitive multidict
    client_ip: str
    mcp_resource: str | None = None  # the public MCP URL when the route is an MCP route


async def evaluate(
    policy: SecurityPolicy, facts: RequestFacts, verifier: JwtVerifier, api_keys: ApiKeyVerifier | None = None
) -> Decision:
    """Credentials first (a bearer JWT or, where the policy accepts them, an API key: either
    one suffices), then authorization rules."""
    token: VerifiedToken | None = None
    sent = False
    jwt = policy.jwt
    if facts.mcp_resource is not None and _query_has_token(facts.raw_query):
        return _deny(policy, 400, "token-in-query", sent=True)
    raw = extract_token(jwt.providers, facts) if jwt is not None else None
    if raw is None and policy.api_key is not None:
        key = extract_api_key(policy.api_key, facts)
        if key is not None:
            principal = await api_keys.verify(key) if api_keys is not None else None
            if principal is None:
                return Decision(False, 401, (Violation("api-key-invalid", "The API key is not valid."),), policy, token_sent=True)
            token = _api_key_token(principal, key)
            sent = True
        elif jwt is None:
            return _deny(policy, 401, "credentials-missing")
    if jwt is not None and token is None:
        if raw is not None:
            try:
                token = await verifier.verify(raw, jwt.providers, facts.mcp_resource)
            except TokenError as e:
                return Decision(False, 401, (Violation(e.reason, e.message),), policy, token_sent=True)
            return _authorize_cached(policy, facts, token)
        elif not jwt.optional:
            return _deny(policy, 401, "credentials-missing")
    return _authorize(policy, facts, token, sent)


def _authorize_cached(policy: SecurityPolicy, facts: RequestFacts, token: VerifiedToken) -> Decision:
    """_authorize for a verified JWT, kept with the token when nothing but the token, the method
    and the path can change the outcome: the verifier caches the token until its `exp`, so a
    client repeating its token with the same request gets the same decision for a lookup."""
    key = (id(policy), facts.method, facts.path)
    decision = token.memo.get(key)
    if decision is not None and decision.policy is policy:  # the id of a live policy is its own
        return decision
    decision = _authorize(policy, facts, token, True)
    if reads_token_and_operation_only(policy):
        token.remember(key, decision)
    return decision


def reads_token_and_operation_only(policy: SecurityPolicy) -> bool:
    """Whether no authorization rule reads request headers or the client address."""
    authorization = policy.authorization
    return authorization is None or not any(r.principal.headers or r.principal.client_cidrs for r in authorization.rules)


def _authorize(policy: SecurityPolicy, facts: RequestFacts, token: VerifiedToken | None, sent: bool) -> Decision:
    """Authorization rules, once the credentials are settled (`token`: a verified one, if any)."""
    jwt = policy.jwt
    if policy.authorization is not None:
        verdict = authz.decide(policy.authorization, facts, token)
        if not verdict.allowed:
            if token is None and jwt is not None:
                return _deny(policy, 401, "credentials-missing")
            scopes = authz.missing_scopes(policy.authorization, facts, token) if token else ()
            if scopes:
                return _deny(policy, 403, "insufficient-scope", token=token, sent=sent, scopes=scopes)
            return _deny(policy, 403, verdict.reason, token=token, sent=sent, rule=verdict.rule)
    if token is None:
        return Decision(True, 200, (), policy, None, sent)
    if token.provider != API_KEY_PROVIDER:
        # The verifier derived claimToHeaders for these very providers (its cache is per providers)
        return Decision(True, 200, (), policy, token, sent, (), token.upstream_headers)
    upstream_headers = claim_headers(jwt.providers, token.provider, token.claims) if jwt else ()
    if policy.api_key is not None and policy.api_key.forward_client_id_header:
        upstream_headers += ((policy.api_key.forward_client_id_header, token.claims["client_id"]),)
    return Decision(True, 200, (), policy, token, sent, upstream_headers=upstream_headers)



def _api_key_token(principal: ApiKeyPrincipal, key: str) -> VerifiedToken:
    """An API key principal in the shape authorization rules read: its owner is `sub`, its
    scopes are `scope`, and `jwt.provider: api-key` selects API-key callers."""
    claims = {"sub": principal.owner, "scope": " ".join(principal.scopes), "client_id": principal.key_id}
    return VerifiedToken(API_KEY_PROVIDER, claims, float("inf"), hashlib.sha256(key.encode()).hexdigest()[:16])


def extract_api_key(auth: ApiKeyAuth, facts: RequestFacts) -> str | None:
    for name in auth.headers:
        value = facts.headers.get(name)
        if value:
            return value.strip()
    if auth.params:
        params = dict(parse_qsl(facts.raw_query))
        for name in auth.params:
            if params.get(name):
                return params[name]
    for name in auth.cookies:
        value = _cookie(facts.headers, name)
        if value:
            return value
    return None


def _cookie(headers, name: str) -> str | None:
    jar = SimpleCookie()
    try:
        jar.load("; ".join(headers.getall("Cookie", ())))
    except CookieError:
        return None
    return jar[name].value if name in jar else None


def extract_token(providers: tuple[JwtProvider, ...], facts: RequestFacts) -> str | None:
    for provider in providers:
        source = provider.source
        for name, prefix in source.headers:
            for value in facts.headers.getall(name, ()):
                if value[: len(prefix)].lower() == prefix.lower():
                    return value[len(prefix):].strip() or None
        for name in source.cookies:
            value = _cookie(facts.headers, name)
            if value:
                return value
        if source.params:
            params = dict(parse_qsl(facts.raw_query, keep_blank_values=False))
            for name in source.params:
                if params.get(name):
                    return params[name]
    return None


def www_authenticate(decision: Decision, realm: str, resource_metadata: str | None) -> str:
    """RFC 6750 §3 challenge, plus RFC 9728 `resource_metadata` on MCP routes."""
    parts = [f'realm="{realm}"']
    if decision.status == 403:
        parts.append('error="insufficient_scope"')
        if decision.required_scopes:
            parts.append(f'scope="{" ".join(decision.required_scopes)}"')
    elif decision.status == 400:
        parts.append('error="invalid_request"')
    elif decision.token_sent:
        parts.append('error="invalid_token"')
        parts.append(f'error_description="{_quoted_string(decision.reasons[0].message)}"')
    if resource_metadata:
        parts.append(f'resource_metadata="{resource_metadata}"')
    return "Bearer " + ", ".join(parts)


def _quoted_string(text: str) -> str:
    """Only characters RFC 9110 allows in a quoted-string without escaping."""
    return "".join(c for c in text if c in _QDTEXT)


_QDTEXT = frozenset(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')


def _deny(policy, status, reason, *, token=None, sent=False, scopes=(), rule=None) -> Decision:
    message = _MESSAGES.get(reason, reason)
    if rule:
        message = f"{message} (rule {rule})"
    return Decision(False, status, (Violation(reason, message),), policy, token, sent, scopes)


def _query_has_token(raw_query: str) -> bool:
    return "access_token" in raw_query and any(k == "access_token" for k, _ in parse_qsl(raw_query, keep_blank_values=True))
