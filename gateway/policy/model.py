"""Frozen policy objects, in Envoy Gateway's vocabulary (SecurityPolicy, BackendTrafficPolicy,
ClientTrafficPolicy). Parsed once by the loader; evaluated by pure functions."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from gateway.config.model import Source

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TargetRef:
    kind: Literal["Gateway", "HTTPRoute"]
    name: str
    section_name: str | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """What every policy kind has: identity, targets, a revision for audit, and an age."""

    namespace: str
    name: str
    revision: str  # changes whenever the spec changes; recorded with every decision
    targets: tuple[TargetRef, ...]
    order: tuple[str, int]
    source: Source | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where a JWT may be read from (extractFrom). Query parameters only when named."""

    headers: tuple[tuple[str, str], ...] = (("Authorization", "Bearer "),)  # (name, value prefix)
    cookies: tuple[str, ...] = ()
    params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JwtProvider:
    name: str
    issuer: str | None
    audiences: tuple[str, ...]
    jwks_uri: str | None
    local_jwks: str | None
    cache_seconds: float
    claim_to_headers: tuple[tuple[str, str], ...]  # (claim, header)
    source: TokenSource


@dataclass(frozen=True, slots=True)
class Jwt:
    providers: tuple[JwtProvider, ...]
    optional: bool = False


@dataclass(frozen=True, slots=True)
class ClaimMatch:
    name: str  # dotted path for nested claims
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Principal:
    client_cidrs: tuple[IPNetwork, ...] = ()
    jwt_provider: str | None = None
    jwt_claims: tuple[ClaimMatch, ...] = ()
    jwt_scopes: tuple[str, ...] = ()
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (lower-case name, accepted values)

    @property
    def uses_jwt(self) -> bool:
        return self.jwt_provider is not None or bool(self.jwt_claims) or bool(self.jwt_scopes)


@dataclass(frozen=True, slots=True)
class PathOperation:
    kind: Literal["Exact", "PathPrefix", "RegularExpression"]
    value: str
    invert: bool = False
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class AuthorizationRule:
    name: str
    action: Literal["Allow", "Deny"]
    principal: Principal
    methods: tuple[str, ...] = ()
    path: PathOperation | None = None


@dataclass(frozen=True, slots=True)
class Authorization:
    rules: tuple[AuthorizationRule, ...]
    default_action: Literal["Allow", "Deny"] = "Deny"


@dataclass(frozen=True, slots=True)
class Cors:
    allow_origins: tuple[str, ...]
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: int | None = None
    allow_credentials: bool = False


@dataclass(frozen=True, slots=True)
class ApiKeyAuth:
    """Keys from Sandgate's own store (`sandgate keys create`), read from the first source
    that has one."""

    headers: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    cookies: tuple[str, ...] = ()
    forward_client_id_header: str | None = None
    sanitize: bool = False


@dataclass(frozen=True, slots=True)
class SecurityPolicy(Policy):
    jwt: Jwt | None = None
    api_key: ApiKeyAuth | None = None
    authorization: Authorization | None = None
    cors: Cors | None = None


@dataclass(frozen=True, slots=True)
class BackendTrafficPolicy(Policy):
    rate_limits: tuple = ()  # of ratelimit.RateLimitRule
    request_timeout: float | None = None
    connect_timeout: float | None = None
    retry: RetryPolicy | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """BackendTrafficPolicy `retry`, with Envoy's trigger names and back-off."""

    attempts: int  # the first try plus numRetries
    triggers: frozenset[str]  # retryOn.triggers
    status_codes: frozenset[int]  # retryOn.httpStatusCodes, used by the retriable-status-codes trigger
    base_interval: float  # seconds; a pause before retry n is drawn from [0, (2^n - 1) * base], capped
    max_interval: float
    per_try_timeout: float | None = None  # bounds each attempt, the first one included


@dataclass(frozen=True, slots=True)
class ClientTrafficPolicy(Policy):
    """Settings of the listeners of a Gateway; they apply to every request it receives."""

    trusted_hops: int = 0
    max_header_bytes: int | None = None
    max_body_bytes: int | None = None
    connection: ConnectionLimits | None = None
    headers_timeout: float | None = None  # timeout.http.requestHeadersReceivedTimeout
    idle_timeout: float | None = None  # timeout.http.idleTimeout


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """ClientTrafficPolicy connection.connectionLimit, for the connections of a listener port."""

    limit: int | None = None  # open connections; more are closed unread
    close_delay: float | None = None  # seconds a connection over the limit is held before it is closed
    max_seconds: float | None = None  # maxConnectionDuration: then closed (a busy one after its response)
    max_requests: int | None = None  # maxRequestsPerConnection: the last one is answered with Connection: close

    def tightest(self, other: ConnectionLimits) -> ConnectionLimits:
        """Each limit at the lower of the two (several Gateways listening on one port)."""
        return ConnectionLimits(lowest(self.limit, other.limit), lowest(self.close_delay, other.close_delay),
                                lowest(self.max_seconds, other.max_seconds), lowest(self.max_requests, other.max_requests))


def lowest(a, b):
    """The lower of two limits, either of which may be unset (None)."""
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What the server protocol holds every connection of a listener port to, resolved once per
    configuration from the ClientTrafficPolicies of the Gateways listening there and the
    process defaults."""

    header_bytes: int  # request line and headers together, counted while they are read
    headers_timeout: float  # from the first byte of a request until its headers are complete
    idle_timeout: float  # a kept-alive connection without a request in flight is then closed
    connection: ConnectionLimits | None = None


@dataclass(frozen=True, slots=True)
class SandboxPolicy(Policy):
    """Who may reach which sandbox and its previews (sandgate.dev/v1alpha1 SandboxPolicy).

    Loaded and attached now; enforced by the sandbox and preview layers."""

    owner_label: str = "sandgate.dev/owner"
    owner_annotation: str | None = None
    shared_with_annotation: str = "sandgate.dev/shared-with"
    admin_groups: tuple[str, ...] = ()
    groups_claim: str = "groups"
    preview_ports: tuple[int, int] = (1, 65535)
    preview_max_per_sandbox: int | None = None
    preview_max_total: int | None = None
    preview_max_per_owner: int | None = 10  # open previews one principal may hold
    preview_approval: str = "auto"
    preview_self_approval: bool = False  # may the requester approve their own request
    preview_max_pending_per_sandbox: int = 10  # pending approval requests of one sandbox
    preview_max_pending_per_requester: int = 5  # pending approval requests of one principal
