"""`sandgate routes` and `sandgate explain`: the compiled table, and a dry run of one request."""

from __future__ import annotations

import asyncio
import sys

from multidict import CIMultiDict
from yarl import URL

from gateway.auth.fetch import JwksFetcher
from gateway.config.loader import LoadOptions, load_routes
from gateway.policy.decision import RequestFacts, evaluate
from gateway.policy.loader import load_policies
from gateway.policy.runtime import PolicyRuntime
from gateway.config.model import Config, RouteMatch, SandboxRouter, Upstream
from gateway.routing.paths import BadRequestTarget, normalize_host, normalize_path
from gateway.routing.rewrite import modify_path, redirect_location
from gateway.routing.table import RequestView, RouteTable, compile_table


def _load(routes_path: str, options: LoadOptions) -> tuple[Config, RouteTable] | None:
    config = load_routes(routes_path, options)
    if config.errors:
        for line in config.errors:
            print(line, file=sys.stderr)
        return None
    return config, compile_table(config)


def describe_match(match: RouteMatch) -> str:
    parts = [f"{match.path.kind} {match.path.value}"]
    if match.method:
        parts.append(f"method={match.method}")
    parts += [f"header {h.name}{'~' if h.pattern else '='}{h.value}" for h in match.headers]
    parts += [f"query {q.name}{'~' if q.pattern else '='}{q.value}" for q in match.query]
    return " ".join(parts)


def describe_upstream(upstream: Upstream | None, reason: str = "", special=None) -> str:
    if isinstance(special, SandboxRouter):
        return f"SandboxRouter {special.key} ({special.resolution} resolution)"
    if special is not None:
        return f"PreviewZone {special.key} (hosts *-preview.{special.zone})"
    if upstream is None:
        return f"invalid ({reason})"
    return f"{upstream.name} -> {', '.join(map(str, upstream.endpoints))}"


def run_routes(routes_path: str, options: LoadOptions) -> int:
    loaded = _load(routes_path, options)
    if loaded is None:
        return 1
    _, table = loaded
    print(f"{'LISTENER':<14} {'HOST':<32} {'MATCH':<44} {'RULE':<28} BACKEND")
    for c in table.ordered_candidates():
        listener = f"{c.listener.name}:{c.listener.port}"
        if c.rule.filters.redirect is not None:
            backend = f"redirect {c.rule.filters.redirect.status}"
        elif c.rule.invalid_reason:
            backend = f"500 ({c.rule.invalid_reason})"
        else:
            backend = "; ".join(
                f"{b.weight}x {describe_upstream(b.upstream, b.invalid_reason, b.special)}" for b in c.rule.backends
            )
        print(f"{listener:<14} {c.host or '*':<32} {describe_match(c.match):<44} {c.rule.label:<28} {backend}")
    return 0


def run_explain(
    routes_path: str,
    policies_path: str,
    options: LoadOptions,
    method: str,
    url: str,
    header_args: list[str],
    token: str | None = None,
) -> int:
    loaded = _load(routes_path, options)
    if loaded is None:
        return 1
    config, table = loaded
    policies = load_policies(policies_path, config)
    if policies.errors:
        for line in policies.errors:
            print(line, file=sys.stderr)
        return 1
    target = URL(url, encoded=True)
    if not target.is_absolute():
        raise BadRequestTarget("URL must be absolute, e.g. http://host/path")
    headers = CIMultiDict()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    for item in header_args:
        name, sep, value = item.partition(":")
        if not sep:
            raise BadRequestTarget(f"header {item!r} must look like 'Name: value'")
        headers.add(name.strip(), value.strip())
    host = normalize_host(target.raw_host or "")
    path = normalize_path(target.raw_path or "/")
    query = target.raw_query_string
    port = _listener_port(config, target)
    method = method.upper()
    print(f"request:  {method} {target.scheme}://{host}{path}{'?' + query if query else ''} (listener port {port})")
    found = table.find(port, host, method, path, RequestView(headers, query))
    if found is None:
        print("result:   404 no route matches")
        return 0
    rule = found.rule
    print(f"listener: {found.listener.gateway} {found.listener.name} ({found.listener.protocol} :{found.listener.port})")
    print(f"route:    HTTPRoute {found.route.key} (hostname {found.host or '*'})")
    print(f"rule:     {rule.label}: {describe_match(found.match)}")
    gateway = found.listener.gateway
    traffic = policies.traffic_for(found.route.key, rule.index, gateway)
    client = policies.client_by_gateway.get(gateway)
    if traffic is not None:
        print(f"traffic:  BackendTrafficPolicy {traffic.key} ({describe_traffic(traffic)})")
    if client is not None:
        print(f"client:   ClientTrafficPolicy {client.key} (trusted hops {client.trusted_hops})")
    security = policies.security_for(found.route.key, rule.index, gateway)
    if security is None:
        print("policy:   none: this route is public")
    else:
        print(f"policy:   SecurityPolicy {security.key} (revision {security.revision})")
        decision = asyncio.run(_decide(policies, config, security, found, method, path, query, headers, target,
                                           options.overrides))
        verdict = "allow" if decision.allowed else f"deny ({decision.status})"
        reasons = ", ".join(f"{v.code}: {v.message}" for v in decision.reasons) or "every check passed"
        print(f"decision: {verdict}: {reasons}")
        if decision.token is not None:
            print(f"principal: {decision.principal} (provider {decision.token.provider}, token {decision.token.fingerprint})")
        if not decision.allowed:
            return 0
    if rule.filters.redirect is not None:
        location = redirect_location(
            rule.filters.redirect, scheme=target.scheme, host=host, listener_port=found.listener.port,
            path=path, query=query, matched_prefix=found.matched_prefix,
        )
        print(f"result:   {rule.filters.redirect.status} redirect to {location}")
        return 0
    if rule.invalid_reason or not any(b.weight > 0 for b in rule.backends):
        print(f"result:   500 {rule.invalid_reason or 'every backend has weight 0'}")
        return 0
    total = sum(b.weight for b in rule.backends)
    for b in rule.backends:
        share = f"{100 * b.weight / total:.0f}%" if total else "0%"
        upstream_path = path
        host_header = headers.get("Host", target.raw_authority)
        for filters in (rule.filters, b.filters):
            if filters.rewrite and filters.rewrite.path:
                upstream_path = modify_path(upstream_path, filters.rewrite.path, found.matched_prefix)
            if filters.rewrite and filters.rewrite.hostname:
                host_header = filters.rewrite.hostname
        if b.special is not None:
            print(f"backend:  {share} {describe_upstream(None, special=b.special)}")
            continue
        if b.upstream is None:
            print(f"backend:  {share} invalid: {b.invalid_reason} -> 500")
            continue
        endpoint = b.upstream.endpoints[0]
        upstream_url = f"{b.upstream.scheme}://{endpoint}{upstream_path}{'?' + query if query else ''}"
        print(f"backend:  {share} {b.upstream.name}")
        print(f"upstream: {method} {upstream_url} (Host: {host_header})")
    if rule.timeouts.request or rule.timeouts.backend_request:
        print(f"timeouts: request={rule.timeouts.request}s backendRequest={rule.timeouts.backend_request}s")
    return 0


async def _decide(policies, config, security, found, method, path, query, headers, target, overrides):
    """The decision a running gateway would make; the only network call is a JWKS fetch."""
    fetcher = JwksFetcher(overrides=overrides)
    try:
        runtime = PolicyRuntime(policies, config, fetcher)
        mcp = runtime.mcp_by_route.get(found.route.key)
        origin = f"{target.scheme}://{target.raw_authority}"
        facts = RequestFacts(method, path, query, headers, "127.0.0.1", origin + mcp.path if mcp else None)
        return await evaluate(security, facts, runtime.verifier)
    finally:
        await fetcher.close()


def _listener_port(config: Config, target: URL) -> int:
    ports = sorted({l.port for l in config.listeners})
    if target.explicit_port and target.port in ports:
        return target.port
    protocol = "HTTPS" if target.scheme == "https" else "HTTP"
    same_protocol = [l.port for l in config.listeners if l.protocol == protocol]
    if same_protocol:
        return same_protocol[0]
    return ports[0] if ports else 0


def describe_traffic(traffic) -> str:
    """What a BackendTrafficPolicy does to the requests of a rule, in one line."""
    parts = [f"{len(traffic.rate_limits)} rate-limit rules"]
    if traffic.request_timeout:
        parts.append(f"request timeout {traffic.request_timeout:g}s")
    if traffic.connect_timeout:
        parts.append(f"connect timeout {traffic.connect_timeout:g}s")
    retry = traffic.retry
    if retry is not None:
        on = sorted(retry.triggers)
        if "retriable-status-codes" in retry.triggers:
            on[on.index("retriable-status-codes")] = "status " + "/".join(map(str, sorted(retry.status_codes)))
        per_try = f", {retry.per_try_timeout:g}s per try" if retry.per_try_timeout else ""
        parts.append(f"{retry.attempts - 1} retries of idempotent requests on {', '.join(on)}{per_try}")
    return "; ".join(parts)
