"""policies/ → frozen policies attached to routes, rules and Gateways (SPEC §2.2).

Precedence for one rule: a policy targeting the rule (HTTPRoute + sectionName) beats one on
the route, which beats one on the Gateway; ties go to the oldest, then by name. The winner's
spec replaces the parent's (no merging).
"""

from __future__ import annotations

import glob
import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field

from gateway.config import schemas
from gateway.config.durations import parse_duration, parse_timeout
from gateway.config.loader import age_key
from gateway.config.model import Config, Source
from gateway.config.yamldoc import Document, YamlError, load_documents
from gateway.policy.model import (
    ApiKeyAuth,
    Authorization,
    AuthorizationRule,
    BackendTrafficPolicy,
    ClaimMatch,
    ClientTrafficPolicy,
    ConnectionLimits,
    Cors,
    Jwt,
    JwtProvider,
    PathOperation,
    Principal,
    RetryPolicy,
    SandboxPolicy,
    SecurityPolicy,
    TargetRef,
    TokenSource,
)
from gateway.policy.ratelimit import UNIT_SECONDS, HeaderSelector, RateLimitRule, SourceSelector

ENVOY = "gateway.envoyproxy.io/v1alpha1"
DEFAULT_JWKS_CACHE = 300.0


@dataclass
class Attached:
    """Which policy of one kind governs each rule: rule or route level, else the Gateway's."""

    by_rule: dict[tuple[str, int], object] = field(default_factory=dict)  # (route key, rule index)
    by_gateway: dict[str, object] = field(default_factory=dict)

    def for_rule(self, route_key: str, rule_index: int, gateway: str):
        found = self.by_rule.get((route_key, rule_index))
        return found if found is not None else self.by_gateway.get(gateway)


@dataclass
class PolicySet:
    security: tuple[SecurityPolicy, ...] = ()
    traffic: tuple[BackendTrafficPolicy, ...] = ()
    client: tuple[ClientTrafficPolicy, ...] = ()
    sandbox: tuple[SandboxPolicy, ...] = ()
    sandbox_attached: Attached = field(default_factory=Attached)
    security_attached: Attached = field(default_factory=Attached)
    traffic_attached: Attached = field(default_factory=Attached)
    client_by_gateway: dict[str, ClientTrafficPolicy] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def by_rule(self) -> dict:
        return self.security_attached.by_rule

    def security_for(self, route_key: str, rule_index: int, gateway: str) -> SecurityPolicy | None:
        return self.security_attached.for_rule(route_key, rule_index, gateway)

    def traffic_for(self, route_key: str, rule_index: int, gateway: str) -> BackendTrafficPolicy | None:
        return self.traffic_attached.for_rule(route_key, rule_index, gateway)


EMPTY = PolicySet()


def load_policies(directory: str | None, config: Config) -> PolicySet:
    result = PolicySet()
    if not directory or not os.path.isdir(directory):
        if directory and os.path.exists(directory):
            result.errors.append(f"{directory}:1: not a directory")
        _warn_public_routes(result, config)
        return result
    documents: list[Document] = []
    for path in sorted(glob.glob(os.path.join(directory, "*.yaml")) + glob.glob(os.path.join(directory, "*.yml"))):
        try:
            documents += load_documents(path)
        except YamlError as e:
            result.errors.append(str(e))
    built: dict[str, list] = {kind: [] for _, kind in _BUILDERS}
    seen: dict[tuple[str, str], Document] = {}
    for order, doc in enumerate(documents):
        errors = schemas.validate(doc.obj)
        where = f"{doc.path}:{doc.line}"
        label = f"{doc.obj.get('kind')} {_key(doc.obj)}"
        if errors:
            result.errors += [f"{doc.path}:{doc.line_of(e.json_path)}: {label}: {e.message}" for e in errors]
            continue
        kind = (doc.obj["apiVersion"], doc.obj["kind"])
        builder = _BUILDERS.get(kind)
        if builder is None:
            result.errors.append(f"{where}: {label}: kind is not a policy")
            continue
        identity = (doc.obj["kind"], _key(doc.obj))
        if identity in seen:
            result.errors.append(f"{where}: {label}: duplicate of the object at {seen[identity].path}:{seen[identity].line}")
            continue
        seen[identity] = doc
        try:
            built[doc.obj["kind"]].append(builder(doc, order))
        except _Invalid as e:
            result.errors.append(f"{doc.path}:{doc.line_of(e.json_path)}: {label}: {e}")
    result.security = tuple(built["SecurityPolicy"])
    result.traffic = tuple(built["BackendTrafficPolicy"])
    result.client = tuple(built["ClientTrafficPolicy"])
    result.sandbox = tuple(built["SandboxPolicy"])
    result.sandbox_attached = _attach(result.sandbox, "SandboxPolicy", config, result.problems)
    result.security_attached = _attach(result.security, "SecurityPolicy", config, result.problems)
    result.traffic_attached = _attach(result.traffic, "BackendTrafficPolicy", config, result.problems)
    client = _attach(result.client, "ClientTrafficPolicy", config, result.problems, gateways_only=True)
    result.client_by_gateway = client.by_gateway
    _warn_public_routes(result, config)
    return result


class _Invalid(ValueError):
    def __init__(self, json_path: tuple, message: str):
        super().__init__(message)
        self.json_path = json_path


def _key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _common(doc: Document, order: int) -> dict:
    """Identity, targets, revision and age: what every policy kind has."""
    obj = doc.obj
    spec = obj["spec"]
    namespace, name = _key(obj).split("/", 1)
    targets = tuple(
        TargetRef(ref["kind"], ref["name"], ref.get("sectionName"))
        for ref in spec.get("targetRefs") or []
    )
    if not targets:
        raise _Invalid(("spec",), "targetRefs is required (targetSelectors are not supported)")
    for i, target in enumerate(targets):
        if target.kind not in ("Gateway", "HTTPRoute"):
            raise _Invalid(("spec", "targetRefs", i), f"cannot target kind {target.kind}")
    revision = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    stamp = age_key(obj["metadata"].get("creationTimestamp"))
    return {
        "namespace": namespace,
        "name": name,
        "revision": revision,
        "targets": targets,
        "order": (stamp, 0),  # ties between equally old policies go by name (SPEC §2.2)
        "source": Source(doc.path, doc.line),
    }


def _security_policy(doc: Document, order: int) -> SecurityPolicy:
    spec = doc.obj["spec"]
    for unsupported in ("basicAuth", "extAuth", "oidc"):
        if spec.get(unsupported):
            raise _Invalid(("spec", unsupported), f"{unsupported} is not supported by this build")
    return SecurityPolicy(
        **_common(doc, order),
        jwt=_jwt(spec.get("jwt")),
        api_key=_api_key(spec.get("apiKeyAuth")),
        authorization=_authorization(spec.get("authorization")),
        cors=_cors(spec.get("cors")),
    )


def _backend_traffic_policy(doc: Document, order: int) -> BackendTrafficPolicy:
    spec = doc.obj["spec"]
    for unsupported in ("circuitBreaker", "healthCheck", "faultInjection", "loadBalancer"):
        if spec.get(unsupported):
            raise _Invalid(("spec", unsupported), f"{unsupported} is not supported by this build")
    rate = spec.get("rateLimit") or {}
    if rate.get("global") or rate.get("type") == "Global":
        raise _Invalid(("spec", "rateLimit"), "global rate limits are not supported (use local)")
    rules = tuple(_rate_rule(("spec", "rateLimit", "local", "rules", i), r)
                  for i, r in enumerate((rate.get("local") or {}).get("rules") or []))
    timeout = spec.get("timeout") or {}
    try:
        request_timeout = parse_duration(timeout["http"]["requestTimeout"]) if (timeout.get("http") or {}).get("requestTimeout") else None
        connect_timeout = parse_duration(timeout["tcp"]["connectTimeout"]) if (timeout.get("tcp") or {}).get("connectTimeout") else None
    except ValueError as e:
        raise _Invalid(("spec", "timeout"), str(e)) from None
    return BackendTrafficPolicy(
        **_common(doc, order), rate_limits=rules, request_timeout=request_timeout or None,
        connect_timeout=connect_timeout, retry=_retry(spec["retry"]) if spec.get("retry") is not None else None,
    )


# Envoy Gateway's defaults, each kept when `retry` leaves it unset (its translator does the same).
_DEFAULT_TRIGGERS = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"})
_DEFAULT_STATUS_CODES = frozenset({503})
_DEFAULT_BASE_INTERVAL = 0.025  # Envoy's; maxInterval defaults to 10 times the base


def _retry(spec: dict) -> RetryPolicy:
    where = ("spec", "retry")
    if spec.get("numAttemptsPerPriority"):
        raise _Invalid(where + ("numAttemptsPerPriority",), "numAttemptsPerPriority is not supported by this build")
    retry_on = spec.get("retryOn") or {}
    per_retry = spec.get("perRetry") or {}
    back_off = per_retry.get("backOff") or {}
    try:
        base = parse_duration(back_off["baseInterval"]) if back_off.get("baseInterval") else _DEFAULT_BASE_INTERVAL
        ceiling = parse_duration(back_off["maxInterval"]) if back_off.get("maxInterval") else 10 * base
        per_try_timeout = parse_timeout(per_retry.get("timeout"))
    except ValueError as e:
        raise _Invalid(where + ("perRetry",), str(e)) from None
    if base <= 0 or ceiling < base:
        raise _Invalid(where + ("perRetry", "backOff"), "baseInterval must be positive and maxInterval not below it")
    return RetryPolicy(
        attempts=1 + spec.get("numRetries", 2),
        triggers=frozenset(retry_on.get("triggers") or _DEFAULT_TRIGGERS),
        status_codes=frozenset(retry_on.get("httpStatusCodes") or _DEFAULT_STATUS_CODES),
        base_interval=base,
        max_interval=ceiling,
        per_try_timeout=per_try_timeout,
    )


def _rate_rule(path: tuple, spec: dict) -> RateLimitRule:
    limit = spec["limit"]
    if limit.get("fromMetadata") or spec.get("cost"):
        raise _Invalid(path, "limits from metadata and request costs are not supported")
    headers: list[HeaderSelector] = []
    source = None
    methods: tuple[str, ...] = ()
    for j, selector in enumerate(spec.get("clientSelectors") or []):
        where = path + ("clientSelectors", j)
        if selector.get("path") or selector.get("queryParams"):
            raise _Invalid(where, "path and queryParams selectors are not supported")
        for h in selector.get("headers") or []:
            kind = h.get("type", "Exact")
            pattern = None
            if kind == "RegularExpression":
                try:
                    pattern = re.compile(h.get("value", ""))
                except re.error as e:
                    raise _Invalid(where, f"invalid regular expression: {e}") from None
            headers.append(HeaderSelector(h["name"].lower(), kind, h.get("value"), pattern, bool(h.get("invert"))))
        cidr = selector.get("sourceCIDR")
        if cidr:
            try:
                network = ipaddress.ip_network(cidr["value"], strict=False)
            except ValueError as e:
                raise _Invalid(where + ("sourceCIDR",), str(e)) from None
            source = SourceSelector(network, cidr.get("type", "Exact") == "Distinct", bool(cidr.get("invert")))
        if selector.get("methods"):
            methods = tuple(m["value"] for m in selector["methods"] if not m.get("invert"))
    return RateLimitRule(limit["requests"], UNIT_SECONDS[limit["unit"]], tuple(headers), source, methods)


_CLIENT_UNSUPPORTED = ("enableProxyProtocol", "grpc", "healthCheck", "http1", "http2", "http3", "path",
                       "proxyProtocol", "scheme", "tcpKeepalive", "tls")
# What this build applies in the sections it reads; anything else set in them is refused.
_CLIENT_SUPPORTED_IN = {
    ("connection",): {"bufferLimit", "connectionLimit"},
    ("connection", "connectionLimit"): {"value", "closeDelay", "maxConnectionDuration", "maxRequestsPerConnection"},
    ("headers",): {"maxRequestHeaderLimit"},
    ("timeout",): {"http"},
    ("timeout", "http"): {"requestHeadersReceivedTimeout", "idleTimeout"},
    ("clientIPDetection",): {"xForwardedFor"},
}


def _refuse_unsupported_client_fields(spec: dict) -> None:
    """As for the other kinds: a ClientTrafficPolicy field this build does not apply is an
    error naming it, never silently ignored."""
    fields = [(("spec", name), spec.get(name)) for name in _CLIENT_UNSUPPORTED]
    for section, supported in _CLIENT_SUPPORTED_IN.items():
        found = spec
        for key in section:
            found = found.get(key) or {}
        fields += [(("spec", *section, name), value) for name, value in found.items() if name not in supported]
    for path, value in fields:
        if value not in (None, False, {}, []):
            raise _Invalid(path, f"{'.'.join(path[1:])} is not supported by this build")


def _client_traffic_policy(doc: Document, order: int) -> ClientTrafficPolicy:
    spec = doc.obj["spec"]
    xff = (spec.get("clientIPDetection") or {}).get("xForwardedFor") or {}
    if xff.get("trustedCIDRs"):
        raise _Invalid(("spec", "clientIPDetection"), "trustedCIDRs is not supported (use numTrustedHops)")
    connection = spec.get("connection") or {}
    headers = spec.get("headers") or {}
    _refuse_unsupported_client_fields(spec)
    try:
        max_headers = _quantity(headers.get("maxRequestHeaderLimit"))
        max_body = _quantity(connection.get("bufferLimit"))
    except ValueError as e:
        raise _Invalid(("spec",), str(e)) from None
    return ClientTrafficPolicy(
        **_common(doc, order),
        trusted_hops=int(xff.get("numTrustedHops") or 0),
        max_header_bytes=max_headers,
        max_body_bytes=max_body,
        connection=_connection_limits(connection.get("connectionLimit")),
        **_client_timeouts((spec.get("timeout") or {}).get("http") or {}),
    )


def _client_timeouts(http: dict) -> dict:
    """timeout.http: Envoy reads "0s" as "no timeout", which would let a client hold a
    connection's headers (or an idle connection) open forever: refused rather than honoured."""
    found = {}
    for field, name in (("requestHeadersReceivedTimeout", "headers_timeout"), ("idleTimeout", "idle_timeout")):
        if http.get(field) is None:
            continue
        try:
            seconds = parse_duration(http[field])
        except ValueError as e:
            raise _Invalid(("spec", "timeout", "http", field), str(e)) from None
        if not seconds:
            raise _Invalid(("spec", "timeout", "http", field), f"{field} must be greater than 0s (0s would disable it)")
        found[name] = seconds
    return found


def _connection_limits(spec: dict | None) -> ConnectionLimits | None:
    if not spec:
        return None
    try:
        return ConnectionLimits(
            limit=spec.get("value"),
            close_delay=parse_duration(spec["closeDelay"]) if spec.get("closeDelay") else None,
            max_seconds=parse_timeout(spec.get("maxConnectionDuration")),
            max_requests=spec.get("maxRequestsPerConnection") or None,
        )
    except ValueError as e:
        raise _Invalid(("spec", "connection", "connectionLimit"), str(e)) from None


_QUANTITY = re.compile(r"^([0-9]+)([KMGTPE]i|[kMGTPE])?$")
_FACTORS = {None: 1, "k": 1000, "K": 1000, "M": 10**6, "G": 10**9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def _quantity(value) -> int | None:
    """A Kubernetes quantity of bytes ("64Ki", "1Mi", 1024)."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    m = _QUANTITY.match(str(value))
    if m is None or m.group(2) not in _FACTORS:
        raise ValueError(f"invalid size {value!r} (e.g. 64Ki, 1Mi)")
    return int(m.group(1)) * _FACTORS[m.group(2)]


def _sandbox_policy(doc: Document, order: int) -> SandboxPolicy:
    spec = doc.obj["spec"]
    owner = spec.get("owner") or {}
    preview = spec.get("preview") or {}
    ports = preview.get("ports") or {}
    low, high = ports.get("min", 1), ports.get("max", 65535)
    if low > high:
        raise _Invalid(("spec", "preview", "ports"), f"ports.min {low} is greater than ports.max {high}")
    return SandboxPolicy(
        **_common(doc, order),
        owner_label=owner.get("label", "sandgate.dev/owner"),
        owner_annotation=owner.get("annotation"),
        shared_with_annotation=spec.get("sharedWithAnnotation", "sandgate.dev/shared-with"),
        admin_groups=tuple(spec.get("adminGroups") or ()),
        groups_claim=spec.get("groupsClaim", "groups"),
        preview_ports=(low, high),
        preview_max_per_sandbox=preview.get("maxPerSandbox"),
        preview_max_total=preview.get("maxTotal"),
        preview_max_per_owner=preview.get("maxPerOwner", 10),
        preview_approval=preview.get("approval", "auto"),
        preview_self_approval=preview.get("selfApproval", False),
        preview_max_pending_per_sandbox=preview.get("maxPendingPerSandbox", 10),
        preview_max_pending_per_requester=preview.get("maxPendingPerRequester", 5),
    )


_BUILDERS = {
    ("sandgate.dev/v1alpha1", "SandboxPolicy"): _sandbox_policy,
    (ENVOY, "SecurityPolicy"): _security_policy,
    (ENVOY, "BackendTrafficPolicy"): _backend_traffic_policy,
    (ENVOY, "ClientTrafficPolicy"): _client_traffic_policy,
}


def _jwt(spec: dict | None) -> Jwt | None:
    if not spec:
        return None
    providers = []
    for i, p in enumerate(spec.get("providers") or []):
        path = ("spec", "jwt", "providers", i)
        remote = p.get("remoteJWKS") or {}
        local = p.get("localJWKS") or {}
        if local and local.get("type", "Inline") != "Inline":
            raise _Invalid(path + ("localJWKS",), "only Inline localJWKS is supported")
        if not remote.get("uri") and not local.get("inline"):
            raise _Invalid(path, "a provider needs remoteJWKS.uri or localJWKS.inline")
        try:
            cache = parse_duration(remote["cacheDuration"]) if remote.get("cacheDuration") else DEFAULT_JWKS_CACHE
        except ValueError as e:
            raise _Invalid(path + ("remoteJWKS", "cacheDuration"), str(e)) from None
        providers.append(
            JwtProvider(
                name=p["name"],
                issuer=p.get("issuer"),
                audiences=tuple(p.get("audiences") or ()),
                jwks_uri=remote.get("uri"),
                local_jwks=local.get("inline"),
                cache_seconds=cache,
                claim_to_headers=tuple((c["claim"], c["header"]) for c in p.get("claimToHeaders") or []),
                source=_token_source(p.get("extractFrom")),
            )
        )
    return Jwt(tuple(providers), bool(spec.get("optional", False)))


def _api_key(spec: dict | None) -> ApiKeyAuth | None:
    if not spec:
        return None
    for i, ref in enumerate(spec.get("credentialRefs") or []):
        if (ref.get("group"), ref.get("kind")) != ("sandgate.dev", "ApiKeyStore"):
            raise _Invalid(
                ("spec", "apiKeyAuth", "credentialRefs", i),
                "keys come from Sandgate's store: use {group: sandgate.dev, kind: ApiKeyStore, name: default}",
            )
    headers: list[str] = []
    params: list[str] = []
    cookies: list[str] = []
    for source in spec.get("extractFrom") or []:
        headers += source.get("headers") or []
        params += source.get("params") or []
        cookies += source.get("cookies") or []
    return ApiKeyAuth(tuple(headers), tuple(params), tuple(cookies), spec.get("forwardClientIDHeader"), bool(spec.get("sanitize")))


def _token_source(spec: dict | None) -> TokenSource:
    if not spec:
        return TokenSource()
    return TokenSource(
        headers=tuple((h["name"], h.get("valuePrefix", "")) for h in spec.get("headers") or []),
        cookies=tuple(spec.get("cookies") or ()),
        params=tuple(spec.get("params") or ()),
    )


def _authorization(spec: dict | None) -> Authorization | None:
    if not spec:
        return None
    rules = []
    for i, r in enumerate(spec.get("rules") or []):
        path = ("spec", "authorization", "rules", i)
        if r.get("cel"):
            raise _Invalid(path + ("cel",), "CEL authorization rules are not supported")
        p = r.get("principal") or {}
        if p.get("clientIPGeoLocations"):
            raise _Invalid(path + ("principal",), "clientIPGeoLocations is not supported")
        try:
            cidrs = tuple(ipaddress.ip_network(c, strict=False) for c in p.get("clientCIDRs") or [])
        except ValueError as e:
            raise _Invalid(path + ("principal", "clientCIDRs"), str(e)) from None
        jwt = p.get("jwt") or {}
        principal = Principal(
            client_cidrs=cidrs,
            jwt_provider=jwt.get("provider"),
            jwt_claims=tuple(ClaimMatch(c["name"], tuple(c["values"])) for c in jwt.get("claims") or []),
            jwt_scopes=tuple(jwt.get("scopes") or ()),
            headers=tuple((h["name"].lower(), tuple(h["values"])) for h in p.get("headers") or []),
        )
        operation = r.get("operation") or {}
        path_spec = operation.get("path")
        path_op = None
        if path_spec:
            pattern = None
            if path_spec.get("type") == "RegularExpression":
                try:
                    pattern = re.compile(path_spec["value"])
                except re.error as e:
                    raise _Invalid(path + ("operation", "path"), f"invalid regular expression: {e}") from None
            path_op = PathOperation(path_spec.get("type", "PathPrefix"), path_spec["value"], bool(path_spec.get("invert")), pattern)
        rules.append(
            AuthorizationRule(
                name=r.get("name") or f"rule-{i}",
                action=r["action"],
                principal=principal,
                methods=tuple(operation.get("methods") or ()),
                path=path_op,
            )
        )
    return Authorization(tuple(rules), spec.get("defaultAction", "Deny"))


def _cors(spec: dict | None) -> Cors | None:
    if not spec:
        return None
    max_age = None
    if spec.get("maxAge"):
        try:
            max_age = int(parse_duration(spec["maxAge"]))
        except ValueError as e:
            raise _Invalid(("spec", "cors", "maxAge"), str(e)) from None
    return Cors(
        allow_origins=tuple(spec.get("allowOrigins") or ()),
        allow_methods=tuple(spec.get("allowMethods") or ()),
        allow_headers=tuple(spec.get("allowHeaders") or ()),
        expose_headers=tuple(spec.get("exposeHeaders") or ()),
        max_age=max_age,
        allow_credentials=bool(spec.get("allowCredentials", False)),
    )


def _attach(policies, kind: str, config: Config, problems: list[str], *, gateways_only: bool = False) -> Attached:
    attached = Attached()
    routes = {r.key: r for r in config.routes}
    gateways = {l.gateway for l in config.listeners}
    rule_level: dict[tuple[str, int], object] = {}
    route_level: dict[str, object] = {}
    for policy in sorted(policies, key=lambda p: (p.order, p.key)):
        for target in policy.targets:
            key = f"{policy.namespace}/{target.name}"
            where = f"{policy.source}: {kind} {policy.key}"
            if target.kind == "Gateway":
                if key not in gateways:
                    problems.append(f"{where}: target Gateway {key} does not exist")
                else:
                    attached.by_gateway.setdefault(key, policy)
                continue
            if gateways_only:
                problems.append(f"{where}: a {kind} can only target a Gateway")
                continue
            route = routes.get(key)
            if route is None:
                problems.append(f"{where}: target HTTPRoute {key} does not exist")
                continue
            if target.section_name is None:
                route_level.setdefault(key, policy)
                continue
            indexes = [r.index for r in route.rules if r.name == target.section_name]
            if not indexes:
                problems.append(f"{where}: HTTPRoute {key} has no rule named {target.section_name!r}")
            for index in indexes:
                rule_level.setdefault((key, index), policy)
    for route in config.routes:
        for rule in route.rules:
            policy = rule_level.get((route.key, rule.index)) or route_level.get(route.key)
            if policy is not None:
                attached.by_rule[(route.key, rule.index)] = policy
    return attached


def _warn_public_routes(result: PolicySet, config: Config) -> None:
    for route in config.routes:
        gateways = {p.gateway for p in route.parents}
        public = [
            rule for rule in route.rules
            if (route.key, rule.index) not in result.security_attached.by_rule
            and not any(g in result.security_attached.by_gateway for g in gateways)
        ]
        if public:
            names = ", ".join(rule.name or str(rule.index) for rule in public)
            where = f"{route.source}: " if route.source else ""
            result.warnings.append(f"{where}HTTPRoute {route.key} is public (no SecurityPolicy): rules {names}")
