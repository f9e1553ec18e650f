"""`sandgate routes` and `sandgate explain`: the compiled table, and a dry run of one request."""

from __future__ import annotations

import sys

from multidict import CIMultiDict
from yarl import URL

from gateway.config.loader import LoadOptions, load_routes
from gateway.config.model import Config, RouteMatch, Upstream
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


def describe_upstream(upstream: Upstream | None, reason: str = "") -> str:
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
                f"{b.weight}x {describe_upstream(b.upstream, b.invalid_reason)}" for b in c.rule.backends
            )
        print(f"{listener:<14} {c.host or '*':<32} {describe_match(c.match):<44} {c.rule.label:<28} {backend}")
    return 0


def run_explain(routes_path: str, options: LoadOptions, method: str, url: str, header_args: list[str]) -> int:
    loaded = _load(routes_path, options)
    if loaded is None:
        return 1
    config, table = loaded
    target = URL(url, encoded=True)
    if not target.is_absolute():
        raise BadRequestTarget("URL must be absolute, e.g. http://host/path")
    headers = CIMultiDict()
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
        if b.upstream is None:
            print(f"backend:  {share} invalid: {b.invalid_reason} -> 500")
            continue
        endpoint = b.upstream.endpoints[0]
        upstream_url = f"{b.upstream.scheme}://{endpoint}{upstream_path}{'?' + query if query else ''}"
        print(f"backend:  {share} {b.upstream.name}")
        print(f"upstream: {method} {upstream_url} (Host: {host_header})")
    if rule.timeouts.request or rule.timeouts.backend_request:
        print(f"timeouts: request={rule.timeouts.request}s backendRequest={rule.timeouts.backend_request}s")
    print("policies: none (policy enforcement is not configured in this build)")
    return 0


def _listener_port(config: Config, target: URL) -> int:
    ports = sorted({l.port for l in config.listeners})
    if target.explicit_port and target.port in ports:
        return target.port
    protocol = "HTTPS" if target.scheme == "https" else "HTTP"
    same_protocol = [l.port for l in config.listeners if l.protocol == protocol]
    if same_protocol:
        return same_protocol[0]
    return ports[0] if ports else 0
