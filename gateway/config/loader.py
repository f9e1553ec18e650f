"""routes.yaml → Config: parse, validate against the CRD schemas, resolve names, freeze.

Three kinds of findings, as a user of `sandgate check` sees them:
- errors: the file cannot be used as it is (YAML syntax, an object the schema rejects, a
  duplicate object). `serve` refuses to start with them and a reload keeps the previous table.
- problems: a reference that does not resolve (missing Backend, unknown kind, cross-namespace
  reference without a ReferenceGrant). The rule stays and answers 500, as the Gateway API says;
  `check` still exits 1.
- warnings: legal but probably unintended (a route that attaches to no listener).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

from gateway.config import schemas
from gateway.config.durations import parse_duration, parse_timeout
from gateway.config.model import (
    BackendChoice,
    Config,
    Endpoint,
    Filters,
    HeaderModifier,
    Listener,
    NO_FILTERS,
    ParentRef,
    PathMatch,
    PathModifier,
    Redirect,
    Route,
    RouteMatch,
    PreviewZone,
    Rule,
    SandboxRouter,
    Source,
    Timeouts,
    Upstream,
    URLRewrite,
    ValueMatch,
)
from gateway.config.yamldoc import Document, YamlError, load_documents, load_documents_from_string
from gateway.routing.paths import BadRequestTarget, normalize_path

GATEWAY_GROUP = "gateway.networking.k8s.io"
ENVOY_GROUP = "gateway.envoyproxy.io"
SANDGATE_GROUP = "sandgate.dev"
DEFAULT_NAMESPACE = "default"


@dataclass
class LoadOptions:
    cluster_domain: str = "cluster.local"
    # "host:port" → (address, port): dial somewhere else than DNS says (local runs, debugging).
    overrides: Mapping[str, tuple[str, int]] = field(default_factory=dict)


def override_for(overrides: Mapping[str, tuple[str, int]], host: str, port: int) -> tuple[str, int] | None:
    """The `--resolve` override of host:port (keys are lower-case; a name's case and trailing
    dot do not matter), or None: the one lookup of every address the gateway dials."""
    return overrides.get(f"{host.lower().rstrip('.')}:{port}") if overrides else None


class _Findings:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.problems: list[str] = []
        self.warnings: list[str] = []


@dataclass
class _Objects:
    """Documents by kind, keyed by "namespace/name", after schema validation."""

    gateways: dict[str, Document] = field(default_factory=dict)
    routes: dict[str, Document] = field(default_factory=dict)
    backends: dict[str, Document] = field(default_factory=dict)
    grants: list[Document] = field(default_factory=list)
    extras: dict[tuple[str, str], Document] = field(default_factory=dict)


_KIND_SLOTS = {
    (f"{GATEWAY_GROUP}/v1", "Gateway"): "gateways",
    (f"{GATEWAY_GROUP}/v1beta1", "Gateway"): "gateways",
    (f"{GATEWAY_GROUP}/v1", "HTTPRoute"): "routes",
    (f"{GATEWAY_GROUP}/v1beta1", "HTTPRoute"): "routes",
    (f"{ENVOY_GROUP}/v1alpha1", "Backend"): "backends",
    (f"{GATEWAY_GROUP}/v1beta1", "ReferenceGrant"): "grants",
    (f"{GATEWAY_GROUP}/v1", "ReferenceGrant"): "grants",
}


def load_routes(path: str, options: LoadOptions | None = None) -> Config:
    return _load(lambda: load_documents(path), options)


def load_routes_from_string(text: str, options: LoadOptions | None = None, path: str = "<string>") -> Config:
    return _load(lambda: load_documents_from_string(text, path), options)


def _load(read, options: LoadOptions | None) -> Config:
    try:
        docs = read()
    except YamlError as e:  # also unreadable files: yamldoc reports them with the path
        return Config((), (), errors=(str(e),))
    return build_config(docs, options or LoadOptions())


def build_config(docs: list[Document], options: LoadOptions) -> Config:
    findings = _Findings()
    objects = _sort_documents(docs, findings)
    listeners = _listeners(objects, findings)
    routes = tuple(
        route
        for order, (key, doc) in enumerate(objects.routes.items())
        if (route := _route(doc, order, objects, options, findings)) is not None
    )
    return Config(
        listeners=listeners,
        routes=routes,
        errors=tuple(findings.errors),
        problems=tuple(findings.problems),
        warnings=tuple(findings.warnings),
        extras=tuple(objects.extras.values()),
    )


# -- documents ---------------------------------------------------------------------------------


def _where(doc: Document, path: tuple = ()) -> str:
    return f"{doc.path}:{doc.line_of(path) if path else doc.line}"


def _describe(doc: Document) -> str:
    meta = doc.obj.get("metadata") or {}
    return f"{doc.obj.get('kind')} {meta.get('namespace') or DEFAULT_NAMESPACE}/{meta.get('name')}"


def _key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or DEFAULT_NAMESPACE}/{meta.get('name')}"


def _sort_documents(docs: list[Document], findings: _Findings) -> _Objects:
    objects = _Objects()
    for doc in docs:
        errors = schemas.validate(doc.obj)
        if errors:
            for err in errors:
                findings.errors.append(f"{_where(doc, err.json_path)}: {_describe(doc)}: {err.message}")
            continue
        kind_id = (doc.obj["apiVersion"], doc.obj["kind"])
        slot = _KIND_SLOTS.get(kind_id)
        if slot == "grants":
            objects.grants.append(doc)
            continue
        if slot is None:
            if doc.obj["apiVersion"].startswith(SANDGATE_GROUP + "/"):
                objects.extras[(doc.obj["kind"], _key(doc.obj))] = doc
            else:
                findings.errors.append(f"{_where(doc)}: {_describe(doc)}: kind is not used in routes.yaml")
            continue
        table: dict[str, Document] = getattr(objects, slot)
        key = _key(doc.obj)
        if key in table:
            findings.errors.append(
                f"{_where(doc)}: {_describe(doc)}: duplicate of the object at {_where(table[key])}"
            )
            continue
        table[key] = doc
    return objects


# -- gateways ----------------------------------------------------------------------------------


def _listeners(objects: _Objects, findings: _Findings) -> tuple[Listener, ...]:
    listeners: list[Listener] = []
    for key, doc in objects.gateways.items():
        namespace = key.split("/")[0]
        names: set[str] = set()
        for i, spec in enumerate(doc.obj["spec"].get("listeners") or []):
            where = _where(doc, ("spec", "listeners", i))
            if spec["name"] in names:
                findings.errors.append(f"{where}: Gateway {key}: duplicate listener name {spec['name']!r}")
                continue
            names.add(spec["name"])
            protocol = spec["protocol"]
            if protocol not in ("HTTP", "HTTPS"):
                findings.problems.append(f"{where}: Gateway {key}: listener {spec['name']}: protocol {protocol} is not supported (HTTP, HTTPS)")
                continue
            tls = spec.get("tls") or {}
            certs = tuple(ref["name"] for ref in tls.get("certificateRefs") or [])
            if protocol == "HTTPS" and not certs:
                findings.errors.append(f"{where}: Gateway {key}: HTTPS listener {spec['name']} needs tls.certificateRefs")
                continue
            allowed = ((spec.get("allowedRoutes") or {}).get("namespaces") or {}).get("from", "Same")
            if allowed == "Selector":
                findings.warnings.append(
                    f"{where}: Gateway {key}: listener {spec['name']}: allowedRoutes namespace selectors "
                    "cannot be evaluated from a file; only routes of the Gateway's namespace attach"
                )
            hostname = spec.get("hostname")
            listeners.append(
                Listener(
                    gateway=key,
                    name=spec["name"],
                    port=spec["port"],
                    protocol=protocol,
                    hostname=hostname.lower() if hostname else None,
                    certificate_names=certs,
                    allowed_namespaces=allowed,
                    gateway_namespace=namespace,
                )
            )
    return tuple(listeners)


# -- routes ------------------------------------------------------------------------------------


def _route(doc: Document, order: int, objects: _Objects, options: LoadOptions, findings: _Findings) -> Route | None:
    obj = doc.obj
    meta = obj["metadata"]
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    spec = obj.get("spec") or {}
    ctx = _RouteContext(doc, namespace, objects, options, findings)
    rules: list[Rule] = []
    for i, rule_spec in enumerate(spec.get("rules") or [{}]):
        rule = ctx.rule(i, rule_spec)
        if rule is None:
            return None
        rules.append(rule)
    parents = tuple(
        ParentRef(
            gateway=f"{ref.get('namespace') or namespace}/{ref['name']}",
            section_name=ref.get("sectionName"),
            port=ref.get("port"),
        )
        for ref in spec.get("parentRefs") or []
        if ref.get("group", GATEWAY_GROUP) == GATEWAY_GROUP and ref.get("kind", "Gateway") == "Gateway"
    )
    route = Route(
        namespace=namespace,
        name=meta["name"],
        hostnames=tuple(sorted({h.lower() for h in spec.get("hostnames") or []})),
        parents=parents,
        rules=tuple(rules),
        order=(age_key(meta.get("creationTimestamp")), order),
        annotations=tuple(sorted((meta.get("annotations") or {}).items())),
        source=Source(doc.path, doc.line),
    )
    if not any(p.gateway in objects.gateways for p in parents):
        findings.warnings.append(f"{_where(doc)}: HTTPRoute {route.key}: no parentRef names a Gateway in this file")
    return route


def age_key(value: Any) -> str:
    """Sortable age: RFC 3339 timestamps first (oldest first), then routes without one."""
    if value is None:
        return "~"
    if isinstance(value, datetime):
        return value.isoformat()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).isoformat()
    except ValueError:
        return "~"


class _RouteContext:
    """Builds the rules of one route, reporting findings at the right line."""

    def __init__(self, doc: Document, namespace: str, objects: _Objects, options: LoadOptions, findings: _Findings):
        self.doc = doc
        self.namespace = namespace
        self.objects = objects
        self.options = options
        self.findings = findings
        self.key = f"{namespace}/{doc.obj['metadata']['name']}"

    def error(self, path: tuple, message: str) -> None:
        self.findings.errors.append(f"{_where(self.doc, path)}: HTTPRoute {self.key}: {message}")

    def problem(self, path: tuple, message: str) -> None:
        self.findings.problems.append(f"{_where(self.doc, path)}: HTTPRoute {self.key}: {message}")

    def rule(self, index: int, spec: dict) -> Rule | None:
        path = ("spec", "rules", index)
        match_specs = spec.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]
        matches = []
        for j, m in enumerate(match_specs):
            match = self.match(path + ("matches", j), m)
            if match is None:
                return None
            matches.append(match)
        filters = self.filters(path + ("filters",), spec.get("filters") or [], matches)
        if filters is None:
            return None
        backends = tuple(
            choice
            for k, ref in enumerate(spec.get("backendRefs") or [])
            if (choice := self.backend(path + ("backendRefs", k), ref)) is not None
        )
        if any(c is _FAILED for c in backends):
            return None
        if filters.redirect is not None and backends:
            self.error(path, "a rule with a RequestRedirect filter cannot have backendRefs")
            return None
        timeouts = spec.get("timeouts") or {}
        try:
            request_timeout = parse_timeout(timeouts.get("request"))
            backend_timeout = parse_timeout(timeouts.get("backendRequest"))
        except ValueError as e:
            self.error(path + ("timeouts",), str(e))
            return None
        if request_timeout and backend_timeout and backend_timeout > request_timeout:
            self.error(path + ("timeouts",), "backendRequest timeout cannot be longer than request timeout")
            return None
        invalid = ""
        if filters.redirect is None and not backends:
            invalid = "rule has no backendRefs"
        return Rule(
            route=self.key,
            index=index,
            name=spec.get("name"),
            matches=tuple(matches),
            filters=filters,
            backends=backends,
            timeouts=Timeouts(request_timeout, backend_timeout),
            invalid_reason=invalid,
        )

    def match(self, path: tuple, spec: dict) -> RouteMatch | None:
        path_spec = spec.get("path") or {"type": "PathPrefix", "value": "/"}
        kind = path_spec.get("type", "PathPrefix")
        value = path_spec.get("value", "/")
        pattern = None
        if kind == "RegularExpression":
            pattern = self.regex(path + ("path", "value"), value)
            if pattern is None:
                return None
        else:
            try:
                normalized = normalize_path(value)
            except BadRequestTarget as e:
                self.error(path + ("path", "value"), f"invalid path {value!r}: {e}")
                return None
            if normalized != value and normalized.rstrip("/") != value.rstrip("/"):
                self.error(path + ("path", "value"), f"path {value!r} is not normalised (use {normalized!r})")
                return None
        headers = self.value_matches(path + ("headers",), spec.get("headers") or [], lower=True)
        query = self.value_matches(path + ("queryParams",), spec.get("queryParams") or [], lower=False)
        if headers is None or query is None:
            return None
        return RouteMatch(PathMatch(kind, value, pattern), headers, query, spec.get("method"))

    def value_matches(self, path: tuple, specs: list, *, lower: bool) -> tuple[ValueMatch, ...] | None:
        out: list[ValueMatch] = []
        seen: set[str] = set()
        for i, spec in enumerate(specs):
            name = spec["name"].lower() if lower else spec["name"]
            if name in seen:
                continue  # Gateway API: only the first entry with an equivalent name counts
            seen.add(name)
            kind = spec.get("type", "Exact")
            pattern = None
            if kind == "RegularExpression":
                pattern = self.regex(path + (i, "value"), spec["value"])
                if pattern is None:
                    return None
            out.append(ValueMatch(name, kind, spec["value"], pattern))
        return tuple(out)

    def regex(self, path: tuple, value: str) -> re.Pattern[str] | None:
        try:
            return re.compile(value)
        except re.error as e:
            self.error(path, f"invalid regular expression {value!r}: {e}")
            return None

    def filters(self, path: tuple, specs: list, matches: list[RouteMatch]) -> Filters | None:
        found: dict[str, Any] = {}
        for i, spec in enumerate(specs):
            kind = spec["type"]
            where = path + (i,)
            if kind in found:
                self.error(where, f"filter {kind} may appear only once per rule")
                return None
            if kind == "RequestHeaderModifier":
                found[kind] = _header_modifier(spec.get("requestHeaderModifier") or {})
            elif kind == "ResponseHeaderModifier":
                found[kind] = _header_modifier(spec.get("responseHeaderModifier") or {})
            elif kind == "URLRewrite":
                rewrite = spec.get("urlRewrite") or {}
                modifier = self.path_modifier(where + ("urlRewrite", "path"), rewrite.get("path"), matches)
                if modifier is False:
                    return None
                found[kind] = URLRewrite(rewrite.get("hostname"), modifier)
            elif kind == "RequestRedirect":
                redirect = spec.get("requestRedirect") or {}
                modifier = self.path_modifier(where + ("requestRedirect", "path"), redirect.get("path"), matches)
                if modifier is False:
                    return None
                found[kind] = Redirect(
                    scheme=redirect.get("scheme"),
                    hostname=redirect.get("hostname"),
                    port=redirect.get("port"),
                    path=modifier,
                    status=redirect.get("statusCode", 302),
                )
            else:
                self.error(where, f"filter type {kind} is not supported by sandgate")
                return None
        if "URLRewrite" in found and "RequestRedirect" in found:
            self.error(path, "URLRewrite and RequestRedirect cannot be used in the same rule")
            return None
        if not found:
            return NO_FILTERS
        return Filters(
            request_headers=found.get("RequestHeaderModifier"),
            response_headers=found.get("ResponseHeaderModifier"),
            rewrite=found.get("URLRewrite"),
            redirect=found.get("RequestRedirect"),
        )

    def path_modifier(self, path: tuple, spec: dict | None, matches: list[RouteMatch]):
        """A PathModifier, None when absent, or False after reporting an error."""
        if not spec:
            return None
        kind = spec["type"]
        if kind == "ReplaceFullPath":
            return PathModifier(kind, spec.get("replaceFullPath", "/"))
        if any(m.path.kind != "PathPrefix" for m in matches):
            self.error(path, "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
            return False
        return PathModifier(kind, spec.get("replacePrefixMatch", "/"))

    def backend(self, path: tuple, ref: dict) -> BackendChoice | None:
        weight = ref.get("weight", 1)
        filters = self.filters(path + ("filters",), ref.get("filters") or [], [])
        if filters is None:
            return _FAILED
        group = ref.get("group", "")
        kind = ref.get("kind", "Service")
        namespace = ref.get("namespace") or self.namespace
        name = ref["name"]
        label = f"{kind} {namespace}/{name}"

        def invalid(reason: str) -> BackendChoice:
            self.problem(path, f"backendRef {label}: {reason}")
            return BackendChoice(weight, None, filters, invalid_reason=reason)

        if namespace != self.namespace and not _granted(self.objects.grants, self.namespace, namespace, group, kind, name):
            return invalid("RefNotPermitted: no ReferenceGrant in namespace " + namespace)
        if group == "" and kind == "Service":
            port = ref.get("port")
            if port is None:
                return invalid("port is required for a Service backendRef")
            host = f"{name}.{namespace}.svc.{self.options.cluster_domain}"
            endpoint = self.endpoint(host, port)
            return BackendChoice(weight, Upstream(f"{label}:{port}", (endpoint,)), filters)
        if group == ENVOY_GROUP and kind == "Backend":
            doc = self.objects.backends.get(f"{namespace}/{name}")
            if doc is None:
                return invalid("BackendNotFound: no such Backend in this file")
            upstream = self.backend_upstream(label, doc)
            if isinstance(upstream, str):
                return invalid(upstream)
            return BackendChoice(weight, upstream, filters)
        if group == SANDGATE_GROUP and kind == "SandboxRouter":
            doc = self.objects.extras.get((kind, f"{namespace}/{name}"))
            if doc is None:
                return invalid(f"{kind} not found in this file")
            return BackendChoice(weight, None, filters, special=sandbox_router(doc))
        if group == SANDGATE_GROUP and kind == "PreviewZone":
            doc = self.objects.extras.get((kind, f"{namespace}/{name}"))
            if doc is None:
                return invalid(f"{kind} not found in this file")
            return BackendChoice(weight, None, filters, special=preview_zone(doc))
        return invalid(f"InvalidKind: backendRef kind {group or 'core'}/{kind} is not supported")

    def backend_upstream(self, label: str, doc: Document) -> Upstream | str:
        """An Envoy Gateway Backend as an Upstream, or the reason it cannot be used.

        Checks the rules its CRD states in CEL, which schema validation cannot evaluate.
        """
        spec = doc.obj["spec"]
        if spec.get("type", "Endpoints") != "Endpoints":
            return f"Backend type {spec['type']} is not supported"
        endpoints: list[Endpoint] = []
        kinds: set[str] = set()
        for ep in spec.get("endpoints") or []:
            given = [k for k in ("fqdn", "ip", "unix") if k in ep]
            if len(given) != 1:
                return "each Backend endpoint needs exactly one of fqdn, ip, unix"
            kinds.add(given[0])
            if "unix" in ep:
                endpoints.append(Endpoint(unix_path=ep["unix"]["path"]))
            elif "ip" in ep:
                endpoints.append(self.endpoint(ep["ip"]["address"], ep["ip"]["port"]))
            else:
                endpoints.append(self.endpoint(ep["fqdn"]["hostname"], ep["fqdn"]["port"]))
        if "fqdn" in kinds and len(kinds) > 1:
            return "fqdn endpoints cannot be mixed with ip or unix endpoints"
        if not endpoints:
            return "Backend has no endpoints"
        tls = spec.get("tls")
        if tls is None:
            return Upstream(label, tuple(endpoints))
        unsupported = [k for k in ("caCertificateRefs", "clientCertificateRef") if tls.get(k)]
        if unsupported:
            return f"Backend tls.{unsupported[0]} is not supported (system CAs or insecureSkipVerify)"
        return Upstream(label, tuple(endpoints), "https", not tls.get("insecureSkipVerify", False), tls.get("sni"))

    def endpoint(self, host: str, port: int) -> Endpoint:
        override = override_for(self.options.overrides, host, port)
        if override is not None:
            return Endpoint(override[0], override[1])
        return Endpoint(host, port)


_FAILED = BackendChoice(0, None, invalid_reason="failed")


def _header_modifier(spec: dict) -> HeaderModifier:
    return HeaderModifier(
        set=tuple((h["name"], h["value"]) for h in spec.get("set") or []),
        add=tuple((h["name"], h["value"]) for h in spec.get("add") or []),
        remove=tuple(spec.get("remove") or []),
    )


def _granted(grants: list[Document], from_ns: str, to_ns: str, group: str, kind: str, name: str) -> bool:
    for doc in grants:
        if _key(doc.obj).split("/")[0] != to_ns:
            continue
        spec = doc.obj["spec"]
        from_ok = any(
            f.get("group") == GATEWAY_GROUP and f.get("kind") == "HTTPRoute" and f.get("namespace") == from_ns
            for f in spec.get("from") or []
        )
        to_ok = any(
            t.get("group", "") == group and t.get("kind") == kind and t.get("name") in (None, name)
            for t in spec.get("to") or []
        )
        if from_ok and to_ok:
            return True
    return False


def sandbox_router(doc: Document) -> SandboxRouter:
    """A SandboxRouter document (schema-valid) as settings; defaults as its CRD states."""
    meta = doc.obj["metadata"]
    spec = doc.obj.get("spec") or {}
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    return SandboxRouter(
        namespace=namespace,
        name=meta["name"],
        resolution=spec.get("resolution", "Cluster"),
        cluster_domain=spec.get("clusterDomain", "cluster.local"),
        allowed_namespaces=tuple(spec.get("allowedNamespaces") or (namespace,)),  # CRD: empty = its own
        default_namespace=spec.get("defaultNamespace") or namespace,
        default_port=spec.get("defaultPort", 8888),
        timeout=parse_timeout(spec.get("timeout")),
        allow_unauthenticated=bool(spec.get("allowUnauthenticated", False)),
        router_token_file=spec.get("routerTokenFile"),
        content_security_policy=spec.get("contentSecurityPolicy", "sandbox"),
        source=Source(doc.path, doc.line),
    )


def preview_zone(doc: Document) -> PreviewZone:
    """A PreviewZone document (schema-valid) as settings; defaults as its CRD states."""
    meta = doc.obj["metadata"]
    spec = doc.obj["spec"]
    ref = spec["gatewayRef"]
    return PreviewZone(
        namespace=meta.get("namespace") or DEFAULT_NAMESPACE,
        name=meta["name"],
        zone=spec["zone"].lower(),
        gateway_namespace=ref["namespace"],
        gateway_name=ref["name"],
        section_name=ref.get("sectionName"),
        access_mode=spec.get("accessMode", "capability"),
        approval_window=parse_duration(spec.get("approvalWindow", "5m")),
        idle_ttl=parse_duration(spec.get("idleTTL", "30m")),
        max_lifetime=parse_duration(spec.get("maxLifetime", "8h")),
        source=Source(doc.path, doc.line),
    )
