"""Frozen, typed configuration objects: what the loader produces and the route table compiles.

Names follow the Gateway API (listener, route, rule, match, filter, backend). Nothing here does
I/O; every object is immutable so a reload can swap a whole table safely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

PathKind = Literal["Exact", "PathPrefix", "RegularExpression"]
ValueKind = Literal["Exact", "RegularExpression"]


@dataclass(frozen=True, slots=True)
class Source:
    """Where an object came from, for `FILE:LINE: message` errors."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class Listener:
    gateway: str  # "namespace/name"
    name: str
    port: int
    protocol: Literal["HTTP", "HTTPS"]
    hostname: str | None  # lower case; may start with "*."
    certificate_names: tuple[str, ...] = ()
    allowed_namespaces: Literal["Same", "All", "Selector"] = "Same"
    gateway_namespace: str = ""


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: PathKind
    value: str
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query parameter match. Header names are stored lower case."""

    name: str
    kind: ValueKind
    value: str
    pattern: re.Pattern[str] | None = None
    # A pattern that every value matches (".*"): a presence test, no regex run per request.
    any_value: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "any_value", self.pattern is not None and self.pattern.pattern in _MATCH_ANYTHING)

    def accepts(self, actual: str) -> bool:
        if self.pattern is not None:
            return self.any_value or self.pattern.search(actual) is not None
        return actual == self.value


_MATCH_ANYTHING = frozenset({".*", "^.*", ".*$", "^.*$"})


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathModifier:
    kind: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    value: str


@dataclass(frozen=True, slots=True)
class URLRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path: PathModifier | None = None
    status: int = 302


@dataclass(frozen=True, slots=True)
class Filters:
    """The filters of a rule or a backendRef, in the shape the proxy applies them."""

    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    rewrite: URLRewrite | None = None
    redirect: Redirect | None = None


NO_FILTERS = Filters()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address an upstream can be dialled at: host:port over TCP or a unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """A resolved backendRef: a name for humans and metrics, and endpoints to dial."""

    name: str  # e.g. "Service platform/api:8000" or "Backend bench/origin"
    endpoints: tuple[Endpoint, ...]
    scheme: Literal["http", "https"] = "http"
    verify_tls: bool = True  # https only: check the upstream's certificate against system CAs
    sni: str | None = None  # https only: server name to present instead of the endpoint host


@dataclass(frozen=True, slots=True)
class SandboxRouter:
    """Settings for header-routed sandbox access (sandgate.dev/v1alpha1 SandboxRouter, §4.1)."""

    namespace: str
    name: str
    resolution: Literal["Cluster", "DNS"] = "Cluster"
    cluster_domain: str = "cluster.local"
    allowed_namespaces: tuple[str, ...] = ()  # never empty once loaded (defaults to its own)
    default_namespace: str = ""
    default_port: int = 8888  # the agent-sandbox router's default
    timeout: float | None = None  # seconds
    allow_unauthenticated: bool = False
    router_token_file: str | None = None
    # Content-Security-Policy added to every sandbox response (SPEC §4.1): sandbox HTML runs in an
    # opaque origin, never the platform's; "" opts out (the CRD refuses allow-same-origin).
    content_security_policy: str = "sandbox"
    source: Source | None = None
    key: str = field(init=False, compare=False)  # "namespace/name", read per request

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.namespace}/{self.name}")


@dataclass(frozen=True, slots=True)
class PreviewZone:
    """Settings for preview hosts `{token}-preview.{zone}` (sandgate.dev/v1alpha1 PreviewZone, §5)."""

    namespace: str
    name: str
    zone: str
    gateway_namespace: str
    gateway_name: str
    section_name: str | None = None
    access_mode: Literal["capability", "owner"] = "capability"
    approval_window: float = 300.0
    idle_ttl: float = 1800.0
    max_lifetime: float = 8 * 3600.0
    source: Source | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class BackendChoice:
    """A weighted backendRef. `upstream` is None when the reference is invalid (500)."""

    weight: int
    upstream: Upstream | None
    filters: Filters = NO_FILTERS
    invalid_reason: str = ""
    special: SandboxRouter | PreviewZone | None = None  # a sandgate.dev backend the gateway serves itself


@dataclass(frozen=True, slots=True)
class Timeouts:
    request: float | None = None  # seconds; None = no deadline
    backend_request: float | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    route: str  # "namespace/name" of the route
    index: int
    name: str | None
    matches: tuple[RouteMatch, ...]
    filters: Filters
    backends: tuple[BackendChoice, ...]
    timeouts: Timeouts = Timeouts()
    invalid_reason: str = ""  # non-empty: the rule matches but answers 500

    @property
    def label(self) -> str:
        return f"{self.route}#{self.name or self.index}"


@dataclass(frozen=True, slots=True)
class ParentRef:
    gateway: str  # "namespace/name"
    section_name: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Route:
    namespace: str
    name: str
    hostnames: tuple[str, ...]
    parents: tuple[ParentRef, ...]
    rules: tuple[Rule, ...]
    order: tuple[str, int]  # (creationTimestamp or "", document order): age for precedence
    annotations: tuple[tuple[str, str], ...] = ()
    source: Source | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything loaded from routes.yaml: listeners, routes and the problems found."""

    listeners: tuple[Listener, ...]
    routes: tuple[Route, ...]
    errors: tuple[str, ...] = ()  # "FILE:LINE: message": the file cannot be used as it is
    problems: tuple[str, ...] = ()  # references that do not resolve: those rules answer 500
    warnings: tuple[str, ...] = ()
    extras: tuple[object, ...] = field(default=())  # sandgate.dev documents

    def served(self, kind: type) -> dict[str, object]:
        """The SandboxRouters or PreviewZones some rule uses, by "namespace/name"."""
        return {
            c.special.key: c.special
            for route in self.routes for rule in route.rules for c in rule.backends
            if isinstance(c.special, kind)
        }
