"""Pure routing: normalisation, rewrites, redirects, hostname intersection and precedence tables.

These run without sockets; the same behaviour is proven end to end in test_conformance.py.
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.config.loader import load_routes_from_string
from gateway.config.model import PathModifier, Redirect
from gateway.routing.attach import intersect
from gateway.routing.paths import BadRequestTarget, normalize_host, normalize_path
from gateway.routing.rewrite import redirect_location, replace_prefix
from gateway.routing.table import RequestView, compile_table
from tests.support.harness import gateway_with


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("/", "/"),
        ("/api/users", "/api/users"),
        ("/api/../admin", "/admin"),
        ("/api/%2e%2e/admin", "/admin"),
        ("/api/%2E%2e/admin", "/admin"),
        ("/api%2Fadmin", "/api%2Fadmin"),
        ("/api%2fadmin", "/api%2Fadmin"),
        ("//api//x", "/api/x"),
        ("/a/./b", "/a/b"),
        ("/a/b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/%7euser", "/~user"),
        ("/x/", "/x/"),
    ],
)
def test_path_normalisation(raw, expected):
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", ["api", "/a b", "/a\x00b", "/%zz", "/%4", "/a\nb", "/a#b"[:0] + "/\x7f"])
def test_malformed_paths_are_refused(raw):
    with pytest.raises(BadRequestTarget):
        normalize_path(raw)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("gw.example", "gw.example"),
        ("GW.Example:8080", "gw.example"),
        ("gw.example.", "gw.example"),
        ("[::1]:443", "[::1]"),
        ("127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_host_normalisation(raw, expected):
    assert normalize_host(raw) == expected


@pytest.mark.parametrize("raw", ["", "evil.com@gw.example", "gw.example:80x", "a..b", "-a.example", "a_b c", "gw.example:123456"])
def test_malformed_hosts_are_refused(raw):
    with pytest.raises(BadRequestTarget):
        normalize_host(raw)


@pytest.mark.parametrize(
    "path,prefix,replacement,expected",
    [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/anything", "/", "/v1", "/v1/anything"),
    ],
)
def test_replace_prefix_match_table(path, prefix, replacement, expected):
    """The table of the Gateway API's HTTPPathModifier documentation, plus a root prefix."""
    assert replace_prefix(path, prefix, replacement) == expected


@pytest.mark.parametrize(
    "redirect,scheme,listener_port,expected",
    [
        (Redirect(), "http", 80, "http://gw.example/p"),
        (Redirect(), "http", 8080, "http://gw.example:8080/p"),
        (Redirect(scheme="https"), "http", 8080, "https://gw.example/p"),
        (Redirect(scheme="https", port=8443), "http", 80, "https://gw.example:8443/p"),
        (Redirect(port=443, scheme="https"), "http", 80, "https://gw.example/p"),
        (Redirect(hostname="example.org", status=301), "https", 443, "https://example.org/p"),
        (Redirect(path=PathModifier("ReplaceFullPath", "/new")), "http", 80, "http://gw.example/new"),
    ],
)
def test_redirect_location_port_rules(redirect, scheme, listener_port, expected):
    location = redirect_location(
        redirect, scheme=scheme, host="gw.example", listener_port=listener_port, path="/p", query="", matched_prefix="/p"
    )
    assert location == expected


@pytest.mark.parametrize(
    "listener,route_hosts,expected",
    [
        (None, (), [""]),
        (None, ("a.example.com",), ["a.example.com"]),
        ("*.example.com", (), ["*.example.com"]),
        ("*.example.com", ("a.example.com", "b.other.com"), ["a.example.com"]),
        ("a.example.com", ("*.example.com",), ["a.example.com"]),
        ("*.example.com", ("*.a.example.com",), ["*.a.example.com"]),
        ("*.a.example.com", ("*.example.com",), ["*.a.example.com"]),
        ("example.com", ("*.example.com",), []),
        ("a.example.com", ("b.example.com",), []),
    ],
)
def test_listener_route_hostname_intersection(listener, route_hosts, expected):
    assert intersect(listener, route_hosts) == expected


def _table(yaml_text: str):
    config = load_routes_from_string(yaml_text)
    assert not config.errors, config.errors
    return compile_table(config)


GATEWAY = gateway_with(
    "{name: http, port: 80, protocol: HTTP}",
    '{name: wild, port: 8080, protocol: HTTP, hostname: "*.example.com"}',
    '{name: exact, port: 8080, protocol: HTTP, hostname: "a.example.com"}',
)


def _route(name: str, body: str, created: str | None = None) -> str:
    stamp = f", creationTimestamp: '{created}'" if created else ""
    return f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: infra{stamp}}}
spec:
{body}"""


def _find(table, port, host, path, method="GET", headers=None, query=""):
    found = table.find(port, host, method, path, RequestView(CIMultiDict(headers or {}), query))
    return None if found is None else (found.route.name, found.rule.index)


def test_regex_ranks_between_exact_and_prefix():
    table = _table(GATEWAY + _route("r", """  parentRefs: [{name: gw, sectionName: http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /users}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/users/[0-9]+"}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: Exact, value: /users/42}}]
    backendRefs: [{name: a, port: 80}]
"""))
    assert _find(table, 80, "x", "/users/42") == ("r", 2)
    assert _find(table, 80, "x", "/users/7") == ("r", 1)
    assert _find(table, 80, "x", "/users/7/x") == ("r", 0)
    assert _find(table, 80, "x", "/users") == ("r", 0)


def test_query_param_matches_exact_and_regex_first_value_only():
    table = _table(GATEWAY + _route("q", """  parentRefs: [{name: gw, sectionName: http}]
  rules:
  - matches: [{queryParams: [{name: v, value: "2"}]}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{queryParams: [{name: env, type: RegularExpression, value: "^(dev|test)$"}]}]
    backendRefs: [{name: a, port: 80}]
  - backendRefs: [{name: a, port: 80}]
"""))
    assert _find(table, 80, "x", "/", query="v=2") == ("q", 0)
    assert _find(table, 80, "x", "/", query="v=3&v=2") == ("q", 2)
    assert _find(table, 80, "x", "/", query="V=2") == ("q", 2)
    assert _find(table, 80, "x", "/", query="env=test") == ("q", 1)
    assert _find(table, 80, "x", "/", query="env=prod") == ("q", 2)


def test_header_values_repeated_are_joined_and_regex_matches():
    table = _table(GATEWAY + _route("h", """  parentRefs: [{name: gw, sectionName: http}]
  rules:
  - matches: [{headers: [{name: X-Tenant, type: RegularExpression, value: "^t-[0-9]+$"}]}]
    backendRefs: [{name: a, port: 80}]
  - backendRefs: [{name: a, port: 80}]
"""))
    assert _find(table, 80, "x", "/", headers={"x-tenant": "t-12"}) == ("h", 0)
    assert _find(table, 80, "x", "/", headers={"X-Tenant": "t-12x"}) == ("h", 1)


def test_older_route_wins_a_tie_then_namespace_and_name():
    body = """  parentRefs: [{name: gw, sectionName: http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /same}}]
    backendRefs: [{name: a, port: 80}]
"""
    table = _table(GATEWAY + _route("zeta", body, "2024-01-01T00:00:00Z") + _route("alpha", body, "2025-01-01T00:00:00Z"))
    assert _find(table, 80, "x", "/same") == ("zeta", 0)
    table = _table(GATEWAY + _route("zeta", body) + _route("alpha", body))
    assert _find(table, 80, "x", "/same") == ("zeta", 0), "document order stands for age without timestamps"


def test_listener_chosen_by_most_specific_hostname():
    table = _table(GATEWAY + _route("on-wild", """  parentRefs: [{name: gw, sectionName: wild}]
  rules:
  - backendRefs: [{name: a, port: 80}]
""") + _route("on-exact", """  parentRefs: [{name: gw, sectionName: exact}]
  rules:
  - backendRefs: [{name: a, port: 80}]
"""))
    assert _find(table, 8080, "a.example.com", "/") == ("on-exact", 0)
    assert _find(table, 8080, "b.example.com", "/") == ("on-wild", 0)
    assert _find(table, 8080, "x.b.example.com", "/") == ("on-wild", 0)
    assert _find(table, 8080, "example.com", "/") is None
    assert _find(table, 80, "a.example.com", "/") is None, "not attached to the port-80 listener"


def test_route_from_other_namespace_needs_allowed_routes():
    other = """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: foreign, namespace: other}
spec:
  parentRefs: [{name: gw, namespace: infra, sectionName: http}]
  rules:
  - backendRefs: [{name: a, port: 80}]
"""
    assert _find(_table(GATEWAY + other), 80, "x", "/") is None
    allowing = GATEWAY.replace("{name: http, port: 80, protocol: HTTP}",
                               "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}")
    assert _find(_table(allowing + other), 80, "x", "/") == ("foreign", 0)


def test_many_routes_lookup_uses_indexes():
    """10,000 hosts and 10,000 prefixes: the table is built and answers each lookup exactly."""
    routes = [GATEWAY]
    for i in range(1000):
        hosts = ", ".join(f"h{i}-{j}.example.net" for j in range(10))
        prefixes = "\n".join(
            f"  - matches: [{{path: {{type: PathPrefix, value: /p{i}-{j}}}}}]\n    backendRefs: [{{name: a, port: 80}}]"
            for j in range(10)
        )
        routes.append(_route(f"r{i}", f"  parentRefs: [{{name: gw, sectionName: http}}]\n  hostnames: [{hosts}]\n  rules:\n{prefixes}\n"))
    table = _table("".join(routes))
    assert _find(table, 80, "h123-7.example.net", "/p123-9/deep/path") == ("r123", 9)
    assert _find(table, 80, "h123-7.example.net", "/p124-0") is None
    assert _find(table, 80, "unknown.example.net", "/p1-1") is None


def test_invalid_references_make_the_rule_answer_500_not_fail_the_file():
    config = load_routes_from_string(GATEWAY + _route("bad", """  parentRefs: [{name: gw, sectionName: http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: nowhere}]
  - matches: [{path: {type: PathPrefix, value: /kind}}]
    backendRefs: [{group: example.com, kind: Bucket, name: b}]
  - matches: [{path: {type: PathPrefix, value: /cross}}]
    backendRefs: [{name: svc, namespace: elsewhere, port: 80}]
"""), path="routes.yaml")
    assert not config.errors
    reasons = " | ".join(config.problems)
    assert "BackendNotFound" in reasons and "InvalidKind" in reasons and "RefNotPermitted" in reasons
    assert all(p.startswith("routes.yaml:") for p in config.problems)
    assert all(rule.backends[0].upstream is None for rule in config.routes[0].rules)


def test_reference_grant_permits_cross_namespace_service():
    grant = """---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow-infra, namespace: elsewhere}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}]
  to: [{group: "", kind: Service}]
"""
    config = load_routes_from_string(GATEWAY + grant + _route("cross", """  parentRefs: [{name: gw, sectionName: http}]
  rules:
  - backendRefs: [{name: svc, namespace: elsewhere, port: 80}]
"""))
    assert not config.errors and not config.problems
    assert config.routes[0].rules[0].backends[0].upstream.endpoints[0].host == "svc.elsewhere.svc.cluster.local"


@pytest.mark.parametrize(
    "rule,message",
    [
        ("""  - matches: [{path: {type: Exact, value: /x}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}}]
    backendRefs: [{name: a, port: 80}]""", "ReplacePrefixMatch"),
        ("""  - filters: [{type: RequestRedirect, requestRedirect: {hostname: a.example}}]
    backendRefs: [{name: a, port: 80}]""", "RequestRedirect"),
        ("""  - matches: [{path: {type: RegularExpression, value: "(unclosed"}}]
    backendRefs: [{name: a, port: 80}]""", "regular expression"),
        ("""  - timeouts: {request: 1s, backendRequest: 2s}
    backendRefs: [{name: a, port: 80}]""", "backendRequest"),
    ],
)
def test_rules_the_schema_cannot_express_are_errors(rule, message):
    config = load_routes_from_string(GATEWAY + _route("r", f"  parentRefs: [{{name: gw}}]\n  rules:\n{rule}\n"))
    assert any(message in e for e in config.errors), config.errors
