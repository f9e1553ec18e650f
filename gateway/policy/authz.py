"""Authorization rules, Envoy Gateway semantics: in order, the first matching rule decides,
no match → defaultAction. Pure functions of the request facts and the verified claims."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from dataclasses import dataclass
from typing import Mapping

from gateway.policy.model import Authorization, AuthorizationRule, ClaimMatch, PathOperation, Principal


@dataclass(frozen=True, slots=True)
class Facts:
    """What authorization may look at."""

    method: str
    path: str
    headers: Mapping[str, str]
    client_ip: str  # parsed only when a rule names client CIDRs
    provider: str | None = None  # the JWT provider that verified the token
    claims: Mapping | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str  # kebab-case code
    rule: str | None = None


def decide(authorization: Authorization, facts: Facts) -> Verdict:
    for rule in authorization.rules:
        if _principal_matches(rule.principal, facts) and _operation_matches(rule, facts):
            if rule.action == "Allow":
                return Verdict(True, "authorization-rule-allowed", rule.name)
            return Verdict(False, "authorization-rule-denied", rule.name)
    if authorization.default_action == "Allow":
        return Verdict(True, "authorization-default-allow")
    return Verdict(False, "authorization-default-deny")


def missing_scopes(authorization: Authorization, facts: Facts) -> tuple[str, ...]:
    """Scopes that would have let an Allow rule match: for `insufficient_scope` answers."""
    have = set(scopes_of(facts.claims))
    for rule in authorization.rules:
        if rule.action != "Allow" or not rule.principal.jwt_scopes:
            continue
        relaxed = Principal(
            rule.principal.client_cidrs, rule.principal.jwt_provider, rule.principal.jwt_claims, (), rule.principal.headers
        )
        if _principal_matches(relaxed, facts) and _operation_matches(rule, facts):
            return tuple(s for s in rule.principal.jwt_scopes if s not in have) or rule.principal.jwt_scopes
    return ()


def _principal_matches(principal: Principal, facts: Facts) -> bool:
    if principal.client_cidrs:
        ip = parse_ip(facts.client_ip)
        if ip is None or not any(ip in net for net in principal.client_cidrs):
            return False
    if principal.uses_jwt:
        if facts.claims is None:
            return False
        if principal.jwt_provider is not None and principal.jwt_provider != facts.provider:
            return False
        if not all(_claim_matches(c, facts.claims) for c in principal.jwt_claims):
            return False
        if principal.jwt_scopes and not set(principal.jwt_scopes) <= set(scopes_of(facts.claims)):
            return False
    for name, values in principal.headers:
        if facts.headers.get(name) not in values:
            return False
    return True


def _operation_matches(rule: AuthorizationRule, facts: Facts) -> bool:
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


@lru_cache(maxsize=4096)
def parse_ip(text: str):
    """An ip_address, or None for anything that is not one (e.g. a unix-socket peer)."""
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
