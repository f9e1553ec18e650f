"""Whose tokens a route accepts: configuration that lets a token meant for one resource be used
at another. Found when the configuration is loaded (`serve` refuses, `check` reports).

- An MCP route's tokens must carry the public MCP URL as audience (SPEC §3.4). Without
  --public-url that URL would come from the request's Host header, which the client chooses.
- A route to sandboxes or previews whose policy accepts any token of its issuers lets a token
  the issuer gave a third-party MCP client (audience the MCP URL, scope mcp:tools) open
  terminals, reach sandbox ports and create previews.
"""

from __future__ import annotations

from gateway.config.model import Config, PreviewZone, SandboxRouter
from gateway.policy.loader import PolicySet
from gateway.policy.model import SecurityPolicy
from gateway.policy.runtime import MCP_ANNOTATION


def mcp_audience_errors(config: Config, policies: PolicySet, public_url: str | None) -> list[str]:
    """An MCP route's tokens must name the public MCP URL as audience. Without --public-url
    that URL would come from the request's Host header, which the client chooses: refuse such
    a route unless every JWT provider of its policy lists its `audiences` explicitly."""
    if public_url:
        return []
    errors = []
    gateways = sorted({listener.gateway for listener in config.listeners})
    for route in config.routes:
        if dict(route.annotations).get(MCP_ANNOTATION) != "true":
            continue
        parents = [p.gateway for p in route.parents] or gateways
        open_policies = sorted({
            policy.key
            for rule in route.rules for gateway in parents
            if (policy := policies.security_for(route.key, rule.index, gateway)) is not None and policy.jwt is not None
            and not all(provider.audiences for provider in policy.jwt.providers)
        })
        if open_policies:
            where = f"{route.source}: " if route.source else ""
            errors.append(
                f"{where}HTTPRoute {route.key} is an MCP route whose token audience would come from the request's "
                f"Host header: set --public-url (SANDGATE_PUBLIC_URL), or `audiences` on every JWT provider of "
                f"SecurityPolicy {', '.join(open_policies)}"
            )
    return errors


def open_token_warnings(config: Config, policies: PolicySet) -> list[str]:
    """`check` warnings: rules to a SandboxRouter or PreviewZone whose SecurityPolicy takes JWTs
    with no audience requirement (a provider without `audiences`) or no scope requirement."""
    warnings = []
    gateways = sorted({listener.gateway for listener in config.listeners})
    for route in config.routes:
        parents = [p.gateway for p in route.parents] or gateways
        for rule in route.rules:
            specials = {c.special.key: c.special for c in rule.backends if isinstance(c.special, (SandboxRouter, PreviewZone))}
            if not specials:
                continue
            for policy in dict.fromkeys(policies.security_for(route.key, rule.index, g) for g in parents):
                missing = _missing_requirements(policy)
                if not missing:
                    continue
                where = f"{route.source}: " if route.source else ""
                backends = ", ".join(f"{type(b).__name__} {key}" for key, b in sorted(specials.items()))
                warnings.append(
                    f"{where}HTTPRoute {route.key} rule {rule.name or rule.index} ({backends}): SecurityPolicy "
                    f"{policy.key} accepts tokens with {' and '.join(missing)}, so a token issued for another "
                    "resource (e.g. an MCP client's) reaches it: set the platform's `audiences` and require a scope"
                )
    return warnings


def _missing_requirements(policy: SecurityPolicy | None) -> list[str]:
    if policy is None or policy.jwt is None:
        return []
    missing = []
    if not all(provider.audiences for provider in policy.jwt.providers):
        missing.append("no audience requirement")
    if not requires_scope(policy):
        missing.append("no scope requirement")
    return missing


def requires_scope(policy: SecurityPolicy) -> bool:
    """Whether every way to be allowed needs a scope: the default denies and every Allow rule
    names `jwt.scopes`."""
    authorization = policy.authorization
    if authorization is None or authorization.default_action != "Deny":
        return False
    allows = [rule for rule in authorization.rules if rule.action == "Allow"]
    return bool(allows) and all(rule.principal.jwt_scopes for rule in allows)
