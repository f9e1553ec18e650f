"""Policies as the request path uses them: which policy governs a rule, JWKS key sets shared by
URI (kept across reloads), the verifier with its token cache, MCP resources and CORS origins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gateway.auth.apikeys import ApiKeyVerifier, Lookup, pepper_secret
from gateway.auth.jwks import Fetch, KeySet
from gateway.auth.jwt import JwtVerifier
from gateway.config.model import Config, Route
from gateway.policy.decision import reads_token_and_operation_only
from gateway.policy.loader import PolicySet
from gateway.policy.model import BackendTrafficPolicy, ClientTrafficPolicy, Cors, JwtProvider, SecurityPolicy

MCP_ANNOTATION = "sandgate.dev/mcp"
METADATA_PATH = "/.well-known/oauth-protected-resource"


@dataclass(frozen=True, slots=True)
class Enforcement:
    """What applying a SecurityPolicy needs besides its decision, derived once per policy."""

    policy: SecurityPolicy
    key: str  # namespace/name, the metric label and the audit record's `policy`
    # Headers the policy itself sets upstream (or sanitizes): never taken from the client.
    strip_headers: tuple[str, ...]
    # (header, lowercase prefix) of the bearer token when an allowed decision can be repeated
    # for the same token, route, method and path (see repeat_source); None when it cannot.
    repeat_source: tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class McpResource:
    route: Route
    path: str  # the MCP endpoint's path, e.g. /mcp
    policy: SecurityPolicy


class PolicyRuntime:
    def __init__(
        self,
        policies: PolicySet,
        config: Config,
        fetch: Fetch,
        *,
        previous: "PolicyRuntime | None" = None,
        on_refresh: Callable[[str, str], None] | None = None,
        api_key_lookup: Lookup | None = None,
    ):
        self.policies = policies
        self.api_keys: ApiKeyVerifier | None = None
        if api_key_lookup is not None and any(p.api_key for p in policies.security):
            self.api_keys = ApiKeyVerifier(pepper_secret().value, api_key_lookup)  # MissingSecret names the file
        self._fetch = fetch
        self._on_refresh = on_refresh
        self._key_sets: dict[tuple, KeySet] = {}
        if previous is not None:
            self._key_sets = previous._key_sets  # keep fetched keys across a reload
        self.verifier = JwtVerifier(self.key_set_for)
        self._enforcement: dict[int, Enforcement] = {}  # by id() of a policy of this runtime
        self.mcp_by_route: dict[str, McpResource] = {}
        self.mcp_by_metadata_path: dict[str, McpResource] = {}
        # Where any policy reads a credential from (SPEC §4.1: none of it reaches a sandbox pod,
        # whatever `sanitize` says; nor a platform cookie a preview). Lower-case header names;
        # Authorization and Proxy-Authorization always (a filter may have set them).
        sources = [source for policy in policies.security for source in (
            *(p.source for p in (policy.jwt.providers if policy.jwt else ())),
            *((policy.api_key,) if policy.api_key else ()))]
        self.credential_cookies = frozenset(name for source in sources for name in source.cookies)
        self.credential_params = frozenset(name for source in sources for name in source.params)
        self.credential_headers = frozenset(
            (header if isinstance(header, str) else header[0]).lower()  # JWT headers are (name, valuePrefix)
            for source in sources for header in source.headers
        ) | {"authorization", "proxy-authorization"}
        for route in config.routes:
            resource = self._mcp_resource(route)
            if resource is not None:
                self.mcp_by_route[route.key] = resource
                self.mcp_by_metadata_path.setdefault(METADATA_PATH + resource.path, resource)
                self.mcp_by_metadata_path.setdefault(METADATA_PATH, resource)

    def security_for(self, route_key: str, rule_index: int, gateway: str) -> SecurityPolicy | None:
        return self.policies.security_for(route_key, rule_index, gateway)

    def traffic_for(self, route_key: str, rule_index: int, gateway: str) -> BackendTrafficPolicy | None:
        return self.policies.traffic_for(route_key, rule_index, gateway)

    def client_policy(self, gateway: str) -> ClientTrafficPolicy | None:
        return self.policies.client_by_gateway.get(gateway)

    def key_set_for(self, provider: JwtProvider) -> KeySet:
        key = (provider.jwks_uri, provider.local_jwks, provider.cache_seconds)
        key_set = self._key_sets.get(key)
        if key_set is None:
            key_set = self._key_sets[key] = KeySet(
                provider.name,
                provider.jwks_uri,
                self._fetch,
                cache_seconds=provider.cache_seconds,
                inline=provider.local_jwks,
                on_refresh=self._on_refresh,
            )
        return key_set

    def _providers(self):
        for policy in self.policies.security:
            yield from policy.jwt.providers if policy.jwt else ()

    async def warm_up(self) -> bool:
        """Fetch every remote key set once; True when all of them have keys (readiness)."""
        for provider in self._providers():
            await self.key_set_for(provider).ensure_fresh()
        return self.keys_loaded()

    def keys_loaded(self) -> bool:
        return all(self.key_set_for(p).loaded for p in self._providers())

    def enforcement(self, policy: SecurityPolicy) -> Enforcement:
        """Derived once per policy, not per request."""
        # By identity: this runtime's policies live as long as it does, and hashing a policy
        # (every nested tuple of it) would cost more than deriving the entry again.
        found = self._enforcement.get(id(policy))
        if found is None or found.policy is not policy:
            found = self._enforcement[id(policy)] = Enforcement(policy, policy.key, _strip_headers(policy), repeat_source(policy))
        return found

    def _mcp_resource(self, route: Route) -> McpResource | None:
        if dict(route.annotations).get(MCP_ANNOTATION) != "true":
            return None
        attached = (self.policies.by_rule.get((route.key, rule.index)) for rule in route.rules)
        policy = next((p for p in attached if p is not None), None)
        if policy is None or policy.jwt is None:
            return None
        prefixes = [m.path.value for rule in route.rules for m in rule.matches if m.path.kind == "PathPrefix"]
        path = (prefixes[0] if prefixes else "/mcp").rstrip("/") or "/"
        return McpResource(route, path, policy)


def repeat_source(policy: SecurityPolicy) -> tuple[str, str] | None:
    """Where a repeated decision's token is read from: the first header of the first JWT provider,
    which is what extract_token reads first, when nothing but the token, the route, the method
    and the path can change an allowed outcome (no rule reads other headers or the client
    address). CORS and MCP requests are told apart by the caller."""
    jwt = policy.jwt
    if jwt is None or not jwt.providers or not jwt.providers[0].source.headers or not reads_token_and_operation_only(policy):
        return None
    name, prefix = jwt.providers[0].source.headers[0]
    return name, prefix.lower()


def _strip_headers(policy: SecurityPolicy) -> tuple[str, ...]:
    found = tuple(h for p in (policy.jwt.providers if policy.jwt else ()) for _, h in p.claim_to_headers)
    if policy.api_key is not None:
        if policy.api_key.forward_client_id_header:
            found += (policy.api_key.forward_client_id_header,)
        if policy.api_key.sanitize:
            found += policy.api_key.headers
    return found


def metadata_document(resource: McpResource, origin: str) -> dict:
    """RFC 9728 protected resource metadata for an MCP endpoint."""
    policy = resource.policy
    scopes = sorted({
        scope
        for rule in (policy.authorization.rules if policy.authorization else ())
        for scope in rule.principal.jwt_scopes
    })
    document = {
        "resource": origin + resource.path,
        "authorization_servers": sorted({p.issuer for p in policy.jwt.providers if p.issuer}),
        "bearer_methods_supported": ["header"],
    }
    if scopes:
        document["scopes_supported"] = scopes
    return document


def origin_allowed(cors: Cors | None, origin: str, own_origin: str) -> bool:
    """Whether a browser Origin may call: our own origin always, others per CORS allowOrigins
    (exact, "*", "scheme://*", or "scheme://*.domain[:port]")."""
    if origin == own_origin:
        return True
    if cors is None:
        return False
    origin_lower = origin.lower()
    for allowed in cors.allow_origins:
        allowed = allowed.lower()
        if allowed in ("*", origin_lower):
            return True
        scheme, sep, rest = allowed.partition("://")
        o_scheme, o_sep, o_rest = origin_lower.partition("://")
        if not sep or not o_sep or scheme != o_scheme:
            continue
        if rest == "*":
            return True
        if rest.startswith("*."):
            host_port = rest[1:]  # ".example.com[:port]"
            if o_rest.endswith(host_port) and len(o_rest) > len(host_port):
                return True
    return False
