"""Authorization rules, Envoy Gateway semantics: in order, the first matching rule decides,
no match → defaultAction. Pure functions of the request facts and the verified token."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping, NamedTuple

from gateway.policy.model import Authorization, AuthorizationRule, ClaimMatch, PathOperation, Principal

if TYPE_CHECKING:
    from gateway.auth.jwt import VerifiedToken
    from gateway.policy.decision import RequestFacts


class Verdict(NamedTuple):
    allowed: bool
    reason: str  # kebab-case code
    rule: str | None = None


# `facts` is what the request shows (decision.RequestFacts: method, path, headers, client_ip);
# `token` the verified credential, if any: its provider, claims and scopes.


def decide(authorization: Authorization, facts: RequestFacts, token: VerifiedToken | None) -> Verdict:
    for rule in authorization.rules:
        if _principal_matches(rule.principal, facts, token) and _operation_matches(rule, facts):
            if rule.action == "Allow":
                return _verdict(True, "authorization-rule-allowed", rule.name)
            return _verdict(False, "authorization-rule-denied", rule.name)
    if authorization.default_action == "Allow":
        return _ALLOWED_BY_DEFAULT
    return _DENIED_BY_DEFAULT


_verdict = lru_cache(maxsize=1024)(Verdict)  # verdicts are immutable: one per rule is enough
_ALLOWED_BY_DEFAULT = Verdict(True, "authorization-default-allow")
_DENIED_BY_DEFAULT = Verdict(False, "authorization-default-deny")


def missing_scopes(authorization: Authorization, facts: RequestFacts, token: VerifiedToken) -> tuple[str, ...]:
    """Scopes that would have let an Allow rule match: for `insufficient_scope` answers."""
    have = token.scopes
    for rule in authorization.rules:
        if rule.action != "Allow" or not rule.principal.jwt_scopes:
            continue
        relaxed = Principal(
            rule.principal.client_cidrs, rule.principal.jwt_provider, rule.principal.jwt_claims, (), rule.principal.headers
        )
        if _principal_matches(relaxed, facts, token) and _operation_matches(rule, facts):
            return tuple(s for s in rule.principal.jwt_scopes if s not in have) or rule.principal.jwt_scopes
    return ()


def _principal_matches(principal: Principal, facts: RequestFacts, token: VerifiedToken | None) -> bool:
    if principal.client_cidrs:
        ip = parse_ip(facts.client_ip)
        if ip is None or not any(ip in net for net in principal.client_cidrs):
            return False
    if principal.uses_jwt:
        if token is None:
            return False
        if principal.jwt_provider is not None and principal.jwt_provider != token.provider:
            return False
        if principal.jwt_claims and not all(_claim_matches(c, token.claims) for c in principal.jwt_claims):
            return False
        if principal.jwt_scopes and not token.scopes.issuperset(principal.jwt_scopes):
            return False
    for name, values in principal.headers:
        if facts.headers.get(name) not in values:
            return False
    return True


def _operation_matches(rule: AuthorizationRule, facts: RequestFacts) -> bool:
    if rule.methods and facts.method not in rule.methods:
        return False
    if rule.path is not None and not _path_matches(rule.path, facts.path):
        return False
    return True


def _path_matches(op: PathOperation, path: str) -> bool:
    if op.kind == "Exact":
        hit = path == op.value
    elif op.kind == "RegularExpression":
        hit = op.pattern.fullmatch(path) is not None
    else:
        prefix = op.value.rstrip("/")
        hit = path == prefix or path.startswith(prefix + "/") or prefix == ""
    return hit != op.invert


MAX_IP_CHARS = 45  # the longest textual IPv6 address (with an embedded IPv4 one)


def parse_ip(text: str):
    """An ip_address, or None for anything that is not one (e.g. a unix-socket peer). The text
    may come from X-Forwarded-For: longer than any address, it is not one, and never cached."""
    if len(text) > MAX_IP_CHARS:
        return None
    return _parse_ip(text)


@lru_cache(maxsize=4096)
def _parse_ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def claim_value(claims: Mapping, dotted: str):
    value = claims
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _claim_matches(match: ClaimMatch, claims: Mapping) -> bool:
    value = claim_value(claims, match.name)
    if isinstance(value, str):
        return value in match.values
    if isinstance(value, list):
        return any(isinstance(v, str) and v in match.values for v in value)
    return False


def scopes_of(claims: Mapping | None) -> list[str]:
    if not claims:
        return []
    value = claims.get("scope", claims.get("scp"))
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []
