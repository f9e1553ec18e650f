"""Sandbox access through a SandboxRouter backend: authenticate, name, authorize, resolve.

The handler hands a request here when its rule's backend is a SandboxRouter; what comes back
is either where to forward it (a `SandboxTarget`, proxied like any other upstream) or the
response that ends it (an error, or the terminal's WebSocket).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace
from inspect import isawaitable
from typing import Awaitable, Callable, Mapping

from aiohttp import web

from gateway.audit import AuditLog, AuditRecord
from gateway.auth.jwt import principal_of
from gateway.config.model import Config, Endpoint, PreviewZone, SandboxRouter, Upstream
from gateway.kube import KubeError
from gateway.policy.model import SandboxPolicy, SecurityPolicy
from gateway.sandbox.access import DEFAULT_POLICY, relation
from gateway.sandbox.address import API_PREFIX, BadSandboxRequest, HeaderAddresses, SandboxAddress, from_path
from gateway.sandbox.destinations import AddressRefused, Destinations
from gateway.sandbox.registry import SandboxInfo, SandboxRegistry
from gateway.sandbox.terminal import Terminals, TooManyTerminals
from gateway.sandbox.token import RouterToken
from gateway.refusal import Refusal
from gateway.secrets import MissingSecret
from gateway.proxy.websocket import is_websocket_upgrade
from gateway.server.enforce import decision_json, record_decision
from gateway.server.errors import refusal_response


# A sandbox never sees the routing headers nor the gateway's own credentials: dropped while the
# request's headers are copied for the upstream.
NOT_FOR_SANDBOXES = frozenset({"authorization", "proxy-authorization"})
NOT_FOR_SANDBOXES_PREFIX = "x-sandbox-"
MAX_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: verified claims (JWT or API key), or a trusted client (router token,
    unauthenticated mode) that may reach every sandbox the router opens."""

    claims: Mapping | None
    identity: str  # for audit: "ISSUER#SUBJECT" (as policy decisions name it), "router-token", "anonymous"
    # The principal as a key (terminals per caller, resuming a shell): (issuer, subject), so
    # the same `sub` from two issuers is two callers.
    key: tuple[str, str] = ("", "")


ROUTER_TOKEN_CALLER = Caller(None, "router-token", ("sandgate", "router-token"))
ANONYMOUS_CALLER = Caller(None, "anonymous", ("sandgate", "anonymous"))


def issuer_of(provider: str, security: SecurityPolicy | None, claims: Mapping) -> str:
    """Who vouches for a verified principal: its JWT provider's configured issuer; for a provider
    that accepts any issuer, the policy and provider that verified it plus the token's `iss`;
    "api-key" for the platform's own API keys."""
    jwt = security.jwt if security is not None else None
    for candidate in jwt.providers if jwt is not None else ():
        if candidate.name == provider:
            return candidate.issuer or f"{security.key}/{provider}|{str(claims.get('iss', ''))[:256]}"
    return provider


@dataclass(frozen=True, slots=True)
class SandboxTarget:
    upstream: Upstream
    path: str
    timeout: float | None
    tag: tuple  # ("sandbox", namespace, name): closes its WebSockets when it is deleted
    isolate: bool = False  # a preview: its own host, so only its own cookies in
    csp: str = ""  # Content-Security-Policy added to its responses (the SandboxRouter's)
    # (claims, SandboxPolicy) the caller was let in with: its streams are re-checked against
    # them when the sandbox's sharing changes (None: a trusted client, nothing to re-check)
    access: tuple | None = None


class SandboxStream:
    """One open exchange with a sandbox (an HTTP response, a WebSocket or a terminal) on behalf
    of a verified caller, kept while it lasts so that it ends when the caller loses access.

    It is also the exchange's WebSocket tag: equal to the sandbox's tag tuple (so a deleted
    sandbox closes it with the others) and, among streams, only to itself."""

    __slots__ = ("tag", "claims", "policy", "task", "terminal", "__weakref__")

    def __init__(self, tag: tuple, claims: Mapping, policy: SandboxPolicy | None, task, terminal: tuple | None = None):
        self.tag, self.claims, self.policy, self.task, self.terminal = tag, claims, policy, task, terminal

    def __eq__(self, other) -> bool:
        if isinstance(other, SandboxStream):
            return other is self
        return other == self.tag

    __hash__ = object.__hash__


def router_errors(config: Config, secured: Callable[[str, int, str], bool]) -> list[str]:
    """SPEC §4.1: a SandboxRouter with no authentication (no SecurityPolicy on a rule that uses
    it, no router token, not allowUnauthenticated) or with a missing token file is refused.
    `secured(route_key, rule_index, gateway)` tells whether a SecurityPolicy applies."""
    errors: list[str] = []
    if not config.served(SandboxRouter):
        for zone in config.served(PreviewZone).values():
            errors.append(f"{zone.source}: PreviewZone {zone.key}: previews live in the namespaces a SandboxRouter "
                          "opens, and no rule uses a SandboxRouter")
    seen: set[str] = set()
    gateways = {listener.gateway for listener in config.listeners}
    for route in config.routes:
        for rule in route.rules:
            for choice in rule.backends:
                router = choice.special
                if not isinstance(router, SandboxRouter) or router.key in seen:
                    continue
                where = f"{router.source}: SandboxRouter {router.key}"
                if router.router_token_file:
                    try:
                        RouterToken(router.router_token_file)
                    except MissingSecret as e:
                        errors.append(f"{where}: {e}")
                        seen.add(router.key)
                        continue
                parents = [p.gateway for p in route.parents] or sorted(gateways)
                if not (router.router_token_file or router.allow_unauthenticated
                        or all(secured(route.key, rule.index, g) for g in parents)):
                    errors.append(
                        f"{where}: no authentication: attach a SecurityPolicy to route {route.key}, "
                        "set routerTokenFile, or set allowUnauthenticated: true"
                    )
                    seen.add(router.key)
    return errors


class SandboxAccess:
    def __init__(self, registry: SandboxRegistry | None, terminals: Terminals | None, audit: AuditLog, *,
                 allow_loopback: bool = False, overrides: Mapping[str, tuple[str, int]] | None = None):
        self.registry = registry
        self.terminals = terminals
        self.audit = audit
        self.destinations = Destinations(allow_loopback=allow_loopback, overrides=overrides)
        self._tokens: dict[str, RouterToken] = {}
        # Per-request work that only depends on a few header values or on the sandbox's watched
        # state is done once: parsed addresses by raw header values, targets by sandbox state.
        # Values carry the router they were made for: a request that raced a reload cannot leave
        # an entry that a router with the same name but other settings would then use.
        self._addresses = HeaderAddresses(MAX_CACHED)
        self._targets: dict[tuple, tuple[SandboxRouter, Upstream, tuple]] = {}
        self._streams: dict[tuple[str, str], set[SandboxStream]] = {}  # (namespace, name) -> open streams

    def configure(self, config: Config) -> None:
        """Routers of a (re)loaded config: their token files and the namespaces to watch."""
        routers = config.served(SandboxRouter)
        tokens = {}
        for router in routers.values():
            if router.router_token_file:
                tokens[router.router_token_file] = self._tokens.get(router.router_token_file) or RouterToken(router.router_token_file)
        self._tokens = tokens
        self._addresses.clear()
        self._targets.clear()
        if self.registry is not None:
            self.registry.watch_namespaces({ns for router in routers.values() for ns in router.allowed_namespaces})

    # --- the request path -----------------------------------------------------------------

    def route(self, request: web.BaseRequest, router: SandboxRouter, *, path: str, rewritten_path: str,
              claims: Mapping | None, issuer: str, secured: bool, policy: SandboxPolicy | None, request_id: str,
              route_key: str, rule_index: int, outcome) -> SandboxTarget | web.StreamResponse | Awaitable[web.StreamResponse]:
        """Where to forward this request, or the response that ends it; for the terminal, an
        awaitable that serves it (the common path stays free of coroutines). A refusal that is
        audited becomes `outcome`'s decision: the access log line says what the audit store says."""
        caller = None

        def refused(refusal: Refusal) -> web.Response:
            if refusal.audited:
                record = self._audit_denial(request, refusal, caller, policy, router, request_id, route_key, path)
                _, outcome.decision = record_decision(self.audit, record, rule_index)  # rolled up like other decisions
                outcome.decision_json = decision_json(record)
            return refusal_response(refusal, request_id, request.headers.get("Accept", ""))

        try:
            caller = self.authenticate(request, router, claims, secured, issuer)
            address = self.address(request, router, path)
            info = self.authorize(router, address, caller, policy)
            if address.terminal:
                return self._terminal(request, address, caller, info, policy, refused)
            target = self.target(router, address, info, rewritten_path)
            access = (caller.claims, policy) if caller.claims is not None else None
            if isawaitable(target):
                return self._settle(target, refused, access)
            return replace(target, access=access) if access is not None else target
        except Refusal as refusal:
            return refused(refusal)

    @staticmethod
    async def _settle(target: Awaitable[SandboxTarget], refused: Callable[[Refusal], web.Response], access: tuple | None):
        """A target whose address had to be resolved first."""
        try:
            resolved = await target
        except Refusal as refusal:
            return refused(refusal)
        return replace(resolved, access=access) if access is not None else resolved

    # --- streams that end when access ends (SPEC §5: shared-with edited) -------------------

    def open_stream(self, target: SandboxTarget) -> SandboxStream:
        """The current task's exchange with the sandbox, remembered until close_stream() when
        its caller's access can change. Every WebSocket to a sandbox gets one as its tag, its
        caller verified or not: a tuple tag would equal (SandboxStream.__eq__) every stream to
        its sandbox, so closing one stream's socket would close them all."""
        claims, policy = target.access if target.access is not None else (None, None)
        stream = SandboxStream(target.tag, claims, policy, asyncio.current_task())
        if claims is not None:
            self._streams.setdefault(target.tag[1:], set()).add(stream)
        return stream

    def close_stream(self, stream: SandboxStream) -> None:
        streams = self._streams.get(stream.tag[1:])
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._streams[stream.tag[1:]]

    def has_streams(self, namespace: str) -> bool:
        """Any tracked stream into this namespace (most watch events concern none)."""
        return any(key[0] == namespace for key in self._streams)

    def lost_access(self, namespace: str, name: str | None) -> list[SandboxStream]:
        """Open streams to the sandbox (every sandbox of the namespace when `name` is None)
        whose caller may no longer reach it, as the cluster now says."""
        keys = [(namespace, name)] if name is not None else [k for k in self._streams if k[0] == namespace]
        lost = []
        for key in keys:
            streams = self._streams.get(key)
            if not streams:
                continue
            info = self.registry.find(*key) if self.registry is not None else None
            for stream in streams:
                if info is None or relation(info, stream.claims, stream.policy or DEFAULT_POLICY) is None:
                    lost.append(stream)
        return lost

    async def _terminal(self, request: web.BaseRequest, address: SandboxAddress, caller: Caller, info: SandboxInfo,
                        policy: SandboxPolicy | None, refused: Callable[[Refusal], web.Response]) -> web.StreamResponse:
        try:
            if not is_websocket_upgrade(request.headers):
                raise Refusal(400, "bad_request", "The terminal is a WebSocket endpoint.")
            if not info.ready:
                raise Refusal(503, "sandbox_not_ready", f"Sandbox {address.namespace}/{address.name} is not ready: {info.not_ready_reason}")
            if self.terminals is None:
                raise Refusal(503, "kubernetes_unavailable", "The terminal needs a Kubernetes connection.")
            try:
                pod = await self.registry.pod_of(info)
                if pod is None:
                    raise Refusal(502, "pod_not_in_sandbox", f"The pod of sandbox {address.namespace}/{address.name} "
                                  "is missing or does not belong to it.", audited=True)
                key = (caller.key, address.namespace, address.name)
                if caller.claims is None:
                    return await self.terminals.open(request, key, pod)
                stream = SandboxStream(("sandbox", address.namespace, address.name), caller.claims, policy,
                                       asyncio.current_task(), terminal=key)
                self._streams.setdefault((address.namespace, address.name), set()).add(stream)
                try:
                    return await self.terminals.open(request, key, pod)
                finally:
                    self.close_stream(stream)
            except TooManyTerminals as e:
                raise Refusal(429, "too_many_terminals", e.message,
                              {"Retry-After": str(max(1, math.ceil(self.terminals.settings.reconnect_window)))}, audited=True) from None
            except KubeError as e:
                raise Refusal(502, "exec_failed", f"The sandbox's shell could not be started ({e.status} {e.reason}).") from None
        except Refusal as refusal:
            return refused(refusal)

    def _audit_denial(self, request, refusal: Refusal, caller: Caller | None, policy, router, request_id, route_key,
                      path) -> AuditRecord:
        record = AuditRecord(
            kind="decision", request_id=request_id, route=route_key,
            policy=f"SandboxPolicy {policy.key}" if policy is not None else f"SandboxRouter {router.key}",
            revision=policy.revision if policy is not None else None,
            principal=caller.identity if caller is not None else None,
            method=request.method, host=request.host, path=path, decision="deny", reasons=(refusal.reason,),
        )
        return record

    def authenticate(self, request: web.BaseRequest, router: SandboxRouter, claims: Mapping | None, secured: bool,
                     issuer: str = "") -> Caller:
        if secured:
            if claims is None:
                raise Refusal(401, "unauthorized", "Sign in to reach a sandbox.", {"WWW-Authenticate": 'Bearer realm="sandgate"'})
            subject = str(claims.get("sub", ""))[:256]
            return Caller(claims, principal_of(issuer, subject), (issuer, subject))
        if router.router_token_file:
            if not self._tokens[router.router_token_file].matches(request.headers.get("Authorization")):
                challenge = 'Bearer realm="sandgate"'
                if "Authorization" in request.headers:
                    challenge += ', error="invalid_token"'
                raise Refusal(401, "unauthorized", "A valid router token is required.", {"WWW-Authenticate": challenge})
            return ROUTER_TOKEN_CALLER
        if router.allow_unauthenticated:
            return ANONYMOUS_CALLER
        raise Refusal(401, "unauthorized", "This sandbox router has no authentication configured.")

    def address(self, request: web.BaseRequest, router: SandboxRouter, path: str) -> SandboxAddress:
        """From the path for the gateway's sandbox endpoints, else from X-Sandbox-* headers."""
        try:
            if path.startswith(API_PREFIX):
                address = from_path(path, router)
                if address is None:
                    raise Refusal(404, "no_route", "No sandbox endpoint at this path.")
                return address
            address = self._addresses.parse(request.headers, router)
            if isinstance(address, str):  # a fresh refusal each time: see HeaderAddresses
                raise Refusal(400, "bad_request", address)
            return address
        except BadSandboxRequest as e:
            raise Refusal(400, "bad_request", str(e)) from None

    def authorize(self, router: SandboxRouter, address: SandboxAddress, caller: Caller, policy: SandboxPolicy | None) -> SandboxInfo | None:
        """The sandbox's cluster state when known (None under DNS resolution without claims to
        check); Refusal(404) when it does not exist or the caller may not see it."""
        needs_state = router.resolution == "Cluster" or caller.claims is not None or address.terminal
        if not needs_state:
            return None
        if self.registry is None:
            raise Refusal(503, "kubernetes_unavailable", "Sandbox state is not available: no Kubernetes connection.")
        info = self.registry.find(address.namespace, address.name)
        if info is None or (caller.claims is not None and relation(info, caller.claims, policy or DEFAULT_POLICY) is None):
            raise Refusal(404, "sandbox_not_found", f"No sandbox {address.name} in namespace {address.namespace}.")
        return info

    def target(self, router: SandboxRouter, address: SandboxAddress, info: SandboxInfo | None,
               path: str) -> SandboxTarget | Awaitable[SandboxTarget]:
        """Where to send the request; `path` is used unless the address names one (port proxy).
        An awaitable when a host name must be resolved (and its addresses checked) first."""
        # Both are one object per meaning: an address per distinct header values (cached by
        # address()), an info per observed state of the sandbox; a change is a new key.
        key = (address, info)
        cached = self._targets.get(key) if address.path is None else None  # port-proxy addresses are per request
        if cached is not None and cached[0] is router:
            return self._sandbox_target(router, address, path, cached[1])
        ip, name, port = self._destination(router, address, info)
        if ip is None:  # a name: resolved, and its addresses checked, every RESOLVED_SECONDS at most
            try:
                dialled = self.destinations.cached(name, port)
            except AddressRefused as e:
                raise _address_refusal(e) from None
            if dialled is None:
                return self._resolve_target(router, address, path, name, port)
            return self._sandbox_target(router, address, path, self._upstream(address, Endpoint(*dialled)))
        upstream = self._upstream(address, Endpoint(ip, port))
        if address.path is None:
            if len(self._targets) >= MAX_CACHED:
                self._targets.clear()
            self._targets[key] = (router, upstream)
        return self._sandbox_target(router, address, path, upstream)

    async def _resolve_target(self, router: SandboxRouter, address: SandboxAddress, path: str, host: str, port: int) -> SandboxTarget:
        try:
            dialled = await self.destinations.resolve(host, port)
        except AddressRefused as e:
            raise _address_refusal(e) from None
        return self._sandbox_target(router, address, path, self._upstream(address, Endpoint(*dialled)))

    @staticmethod
    def _upstream(address: SandboxAddress, endpoint: Endpoint) -> Upstream:
        return Upstream(f"Sandbox {address.namespace}/{address.name}:{address.port}", (endpoint,))

    @staticmethod
    def _sandbox_target(router: SandboxRouter, address: SandboxAddress, path: str, upstream: Upstream) -> SandboxTarget:
        timeout = router.timeout
        if address.timeout is not None:
            timeout = min(timeout, address.timeout) if timeout is not None else address.timeout
        return SandboxTarget(upstream, address.path or path, timeout, ("sandbox", address.namespace, address.name),
                             csp=router.content_security_policy)

    def _destination(self, router: SandboxRouter, address: SandboxAddress,
                     info: SandboxInfo | None) -> tuple[str | None, str | None, int]:
        """(checked pod IP, None, port), or (None, host name to resolve, port)."""
        port = address.port or router.default_port
        if router.resolution == "DNS":
            return None, f"{address.name}.{address.namespace}.svc.{router.cluster_domain}", port
        assert info is not None
        ip = self._pod_ip(info)
        return (ip, None, port) if ip is not None else (None, info.service_fqdn, port)

    async def pod_endpoint(self, info: SandboxInfo, port: int) -> tuple[Endpoint, bool]:
        """Where a Ready sandbox's port is dialled (previews), and whether that may be kept: a
        checked pod IP (kept), else its Service's name resolved, every address checked, and the
        checked one dialled (resolved again after RESOLVED_SECONDS), as for DNS resolution."""
        ip = self._pod_ip(info)
        if ip is not None:
            return Endpoint(ip, port), True
        try:
            dialled = self.destinations.cached(info.service_fqdn, port)
            if dialled is None:
                dialled = await self.destinations.resolve(info.service_fqdn, port)
        except AddressRefused as e:
            raise _address_refusal(e) from None
        return Endpoint(*dialled), False

    def _pod_ip(self, info: SandboxInfo) -> str | None:
        """A Ready sandbox's first pod IP the gateway may dial; None when only its Service's name
        is left. Pod IPs come from cluster state, never from the client; still, an address that
        means this machine or a metadata service is never dialled (destinations.py)."""
        if not info.ready:
            raise Refusal(503, "sandbox_not_ready", f"Sandbox {info.namespace}/{info.name} is not ready: {info.not_ready_reason}")
        for ip in info.pod_ips:
            if self.destinations.allowed(ip):
                return ip
        if info.service_fqdn:
            return None
        if info.pod_ips:
            raise Refusal(503, "address_not_allowed", f"Sandbox {info.namespace}/{info.name} has no address the gateway may dial.",
                          audited=True)
        raise Refusal(503, "sandbox_not_ready", f"Sandbox {info.namespace}/{info.name} has no address yet.")


def _address_refusal(e: AddressRefused) -> Refusal:
    # SPEC §4.1: a name that resolves to nothing is a 502; one that resolves where the gateway
    # must not go is refused the same way, before anything is dialled, and audited.
    return Refusal(502, e.code, e.message, audited=e.code == "address_not_allowed")
