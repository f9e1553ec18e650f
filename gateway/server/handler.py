"""The per-request flow: normalise → match → filters → forward, then record.

Routing decides (a pure lookup in the frozen table), the proxy moves bytes; this module is the
glue between them and the only place that turns their outcomes into statuses.
"""

from __future__ import annotations

import asyncio
from inspect import isawaitable
from random import getrandbits
import re
from dataclasses import dataclass, field, replace
from time import monotonic

from aiohttp import WSCloseCode, web
from multidict import CIMultiDict
from yarl import URL

from gateway.audit import AuditLog
from gateway.config.model import Filters, PreviewZone
from gateway.proxy import websocket
from gateway.proxy.headers import append_forwarded, apply_modifier, end_to_end
from gateway.proxy.h1limits import ResponseLimits
from gateway.proxy.http import Exchange, ForwardPlan, forward
from gateway.proxy.retry import RetryBudget, RetryPlan
from gateway.proxy.upstream import UpstreamPool
from gateway.policy.model import ConnectionLimits, ListenerLimits, RetryPolicy, lowest
from gateway.policy.runtime import METADATA_PATH, PolicyRuntime
from gateway.routing.paths import BadRequestTarget, normalize_host_cached, normalize_path, split_target
from gateway.routing.rewrite import modify_path, redirect_location
from gateway.routing.table import Candidate, RequestView, RouteTable
from gateway.preview.isolation import (
    host_only_cookies, isolate_response, strip_credentials, without_params, without_set_cookies,
)
from gateway.preview.router import PreviewRouter
from gateway.preview.tokens import redact_host, redact_path
from gateway.sandbox.router import NOT_FOR_SANDBOXES, NOT_FOR_SANDBOXES_PREFIX, SandboxAccess, issuer_of
from gateway.server.accesslog import AccessLog
from gateway.refusal import Refusal
from gateway.server.errors import SERVER, error_response, refusal_response
from gateway.policy.authz import parse_ip
from gateway.policy.ratelimit import LocalRateLimiter
from gateway.server.enforce import client_address, enforce, metadata_response, rate_limit_headers
from gateway.server.metrics import Metrics
from gateway.server.protocol import HTTP09

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,200}")
UNMATCHED = "unmatched"


@dataclass
class Settings:
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    max_header_bytes: int = 64 * 1024  # request line and headers together (SPEC §3.1)
    max_header_line_bytes: int = 16 * 1024  # one header line, name and value
    request_headers_timeout: float = 30.0  # ClientTrafficPolicy timeout.http may change these two
    client_idle_timeout: float = 75.0
    connection_limit: int | None = None  # open connections per port unless a ClientTrafficPolicy sets one
    max_body_bytes: int | None = None
    trusted_hops: int = 0
    websocket: websocket.WebSocketLimits = field(default_factory=websocket.WebSocketLimits)
    public_url: str | None = None  # e.g. https://agents.example.com: what clients really dialled
    allow_loopback_sandboxes: bool = False  # local runs and tests only: pods on 127.0.0.0/8

    def __post_init__(self) -> None:
        # Parsed once: the origin is used per request by policies, the URL parts by redirects.
        url = URL(self.public_url) if self.public_url else None
        self.public_base = self.public_url.rstrip("/") if self.public_url else None
        self._public_host = url.host.lower() if url is not None and url.host else None
        self._public_scheme_port = (url.scheme, url.port or 0) if url is not None else None

    def public_origin(self, host: str) -> tuple[str, int] | None:
        """(scheme, port) of the public URL when `host` is its host: TLS and the public port
        are often in front of the pods, and redirects must point where clients come from."""
        return self._public_scheme_port if host == self._public_host else None


class Gateway:
    """Shared state of one process: the current route table and the long-lived clients."""

    def __init__(
        self,
        table: RouteTable,
        policies: PolicyRuntime,
        settings: Settings,
        metrics: Metrics,
        access_log: AccessLog,
        audit: AuditLog,
    ):
        self.table = table
        self.audit = audit
        self.policies = policies  # swapped together with the table on reload
        self.settings = settings
        self.metrics = metrics
        self.access_log = access_log
        # An upstream's response head is held to the size a client's request head is held to.
        self.pool = UpstreamPool(limits=ResponseLimits(settings.max_header_bytes, settings.max_header_line_bytes))
        self.rate_limiter = LocalRateLimiter()  # outlives reloads; keeps the buckets of current revisions
        metrics.watch_sizes(lambda: self.rate_limiter, lambda: self.pool)
        self._retry_budgets: dict[tuple[str, int], RetryBudget] = {}  # per route rule, as Envoy Gateway's
        self.sockets = websocket.OpenSockets()
        self.sandboxes: SandboxAccess | None = None  # set when a SandboxRouter is configured
        self.previews: PreviewRouter | None = None  # set when a PreviewZone is configured
        self.draining = False
        self._listener_limits: tuple[PolicyRuntime | None, dict[int, ListenerLimits]] = (None, {})

    def listener_limits(self, port: int) -> ListenerLimits:
        """What each new connection on `port` is held to; resolved once per configuration (the
        policies are swapped on reload, so a reload is followed by the next connection)."""
        resolved_for, by_port = self._listener_limits
        if resolved_for is not self.policies:
            by_port = self._resolve_listener_limits()
            self._listener_limits = (self.policies, by_port)
        found = by_port.get(port)
        return found if found is not None else self._default_limits()

    def _default_limits(self, connection: ConnectionLimits | None = None) -> ListenerLimits:
        s = self.settings
        if s.connection_limit and (connection is None or connection.limit is None):
            connection = replace(connection or ConnectionLimits(), limit=s.connection_limit)
        return ListenerLimits(s.max_header_bytes, s.request_headers_timeout, s.client_idle_timeout, connection)

    def _resolve_listener_limits(self) -> dict[int, ListenerLimits]:
        """Per port, from the Gateways listening there: connectionLimit and the timeouts at the
        lowest any of their ClientTrafficPolicies sets (else the defaults); the header limit at
        the highest any Gateway allows, since the Gateway is only known once the headers are read
        (each Gateway's own lower limit is then checked per request)."""
        defaults = self._default_limits()
        gateways: dict[int, set[str]] = {}
        for listener in self.table.config.listeners:
            gateways.setdefault(listener.port, set()).add(listener.gateway)
        by_port = {}
        for port, names in gateways.items():
            connection, headers_timeout, idle_timeout, header_bytes = None, None, None, 0
            for name in sorted(names):
                client = self.policies.client_policy(name)
                allowed = defaults.header_bytes
                if client is not None:
                    if client.connection is not None:
                        connection = client.connection if connection is None else connection.tightest(client.connection)
                    headers_timeout = lowest(headers_timeout, client.headers_timeout)
                    idle_timeout = lowest(idle_timeout, client.idle_timeout)
                    allowed = min(allowed, client.max_header_bytes or allowed)
                header_bytes = max(header_bytes, allowed)
            by_port[port] = ListenerLimits(header_bytes, headers_timeout or defaults.headers_timeout,
                                           idle_timeout or defaults.idle_timeout,
                                           self._default_limits(connection).connection)
        return by_port

    def handler_for_port(self, port: int):
        """The request handler of the socket(s) serving Gateway listeners on `port`."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await self.handle(request, port)

        return handle

    async def handle(self, request: web.BaseRequest, port: int) -> web.StreamResponse:
        started = monotonic()
        headers = request.headers
        incoming_id = headers.get("X-Request-Id")
        request_id = incoming_id if incoming_id and _REQUEST_ID.fullmatch(incoming_id) else f"{getrandbits(128):032x}"
        outcome = _Outcome()
        try:
            response = await self._route_and_forward(request, port, request_id, outcome)
        except Refusal as refusal:
            response = refusal_response(refusal, request_id, request.headers.get("Accept", ""))
            outcome.status = refusal.status
        except asyncio.CancelledError:
            # The client went away (499, nginx's convention), or closed an upgraded WebSocket.
            outcome.status = outcome.status or 499
            self._record(request, request_id, outcome, started)
            raise
        outcome.status = outcome.status or response.status
        self._record(request, request_id, outcome, started)
        return response

    async def _route_and_forward(self, request: web.BaseRequest, port: int, request_id: str, outcome: "_Outcome"):
        parsed = self._parse(request, request_id)
        if isinstance(parsed, web.StreamResponse):
            return parsed
        host, path, query, authority = parsed
        outcome.path = path
        outcome.host = host
        if path.startswith(METADATA_PATH) and request.method in ("GET", "HEAD"):
            metadata = metadata_response(self.policies, path, self._origin(request))
            if metadata is not None:
                return metadata
        headers = request.headers
        found = self.table.find(port, host, request.method, path, RequestView(headers, query))
        if found is None:
            return self._error(request, 404, "no_route", "No route matches this request.", request_id)
        outcome.route = found.route.key
        rule = found.rule
        gateway = found.listener.gateway
        client = self.policies.client_policy(gateway)
        trusted_hops = client.trusted_hops if client is not None else self.settings.trusted_hops
        client_ip = outcome.client = client_address(request, trusted_hops)
        if client is not None and client.max_header_bytes and _header_bytes(request) > client.max_header_bytes:
            return self._error(request, 431, "headers_too_large", "The request headers are too large.", request_id)
        is_websocket = websocket.is_websocket_upgrade(headers)
        allowed = None
        policy = self.policies.security_for(found.route.key, rule.index, gateway)
        if policy is not None:
            result = await enforce(
                self.policies, policy, request, route_key=found.route.key, rule_index=rule.index, path=path, query=query,
                origin_of=self._origin, client_ip=client_ip, is_websocket=is_websocket,
                request_id=request_id, host=redact_host(host), metrics=self.metrics, audit=self.audit, outcome=outcome,
            )
            if isinstance(result, web.StreamResponse):
                return result
            allowed = result
        if rule.filters.redirect is not None:
            return self._redirect(request, found, host, path, query, request_id)
        choice = found.backends.pick() if not rule.invalid_reason else None
        if choice is None or (choice.upstream is None and choice.special is None):
            return self._error(request, 500, "no_backend", "The matched rule has no valid backend.", request_id)
        limit = (client.max_body_bytes if client is not None else None) or self.settings.max_body_bytes
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            return self._error(request, 413, "body_too_large", "The request body is too large.", request_id)

        upstream_path, upstream_host = _rewrite(found, rule.filters, choice.filters, path)
        upstream = choice.upstream
        sandbox = None
        if choice.special is not None:
            if isinstance(choice.special, PreviewZone):
                sandbox = await self._preview(request, choice.special, found, gateway, host, path, allowed, request_id)
            else:
                sandbox = self._sandbox(request, choice.special, found, gateway, path, upstream_path, allowed, policy, request_id,
                                        outcome)
                if isawaitable(sandbox):  # the terminal
                    sandbox = await sandbox
            if isinstance(sandbox, web.StreamResponse):
                outcome.status = 101 if isinstance(sandbox, web.WebSocketResponse) else sandbox.status
                return sandbox
            upstream, upstream_path = sandbox.upstream, sandbox.path
        out_headers = self._upstream_headers(
            request, found, choice, allowed, request_id, host=upstream_host or authority,
            forwarded_host=authority or headers.get("Host", host), trusted_hops=trusted_hops,
            to_sandbox=sandbox is not None,
        )
        traffic = self.policies.traffic_for(found.route.key, rule.index, gateway)
        rate_headers: tuple[tuple[str, str], ...] = ()
        if traffic is not None and traffic.rate_limits:
            token = allowed.decision.token if allowed is not None and allowed.decision is not None else None
            limited = self._rate_limit(request, traffic, out_headers, client_ip, found.route.key, request_id,
                                       None if token is None else token.issuer)
            if isinstance(limited, web.StreamResponse):
                return limited
            rate_headers = limited
        if sandbox is not None:
            # SPEC §4.1: no platform credential reaches a sandbox pod (after rate limiting, which
            # may key on a credential header): every header, cookie and query parameter any
            # SecurityPolicy reads one from, whatever `sanitize` says.
            policies = self.policies
            for name in policies.credential_headers:
                out_headers.popall(name, None)
            if "Cookie" in out_headers:
                strip_credentials(out_headers, policies.credential_cookies)
            if policies.credential_params and query:
                query = without_params(query, policies.credential_params)

        def edit_response(response_headers: CIMultiDict) -> None:
            response_headers["X-Request-Id"] = request_id
            response_headers.update(rate_headers)
            if allowed is not None:
                for name, value in allowed.response_headers:
                    if name == "Vary":  # add to the upstream's Vary, never replace it
                        value = ", ".join([*response_headers.popall("Vary", ()), value])
                    response_headers[name] = value
            apply_modifier(response_headers, rule.filters.response_headers)
            apply_modifier(response_headers, choice.filters.response_headers)
            if sandbox is not None:
                # A sandbox cannot set cookies for the platform's domain, and its HTML runs in an
                # opaque origin: ours is added after any CSP it sent (browsers enforce them all).
                if sandbox.isolate:  # a preview: also no Referer of its URL (the token)
                    isolate_response(response_headers)
                elif "Set-Cookie" in response_headers:
                    host_only_cookies(response_headers)
                    # served on a platform host: no cookie of the platform's own names
                    without_set_cookies(response_headers, self.policies.credential_cookies)
                if not sandbox.isolate:
                    response_headers.popall("Clear-Site-Data", None)  # nor wipe the platform's
                if sandbox.csp:
                    response_headers.add("Content-Security-Policy", sandbox.csp)

        request_timeout = rule.timeouts.request or (traffic.request_timeout if traffic is not None else None)
        if sandbox is not None and sandbox.timeout is not None:
            request_timeout = min(request_timeout or sandbox.timeout, sandbox.timeout)
        plan = ForwardPlan(
            endpoint=self.pool.pick(upstream),
            scheme=upstream.scheme,
            method=request.method,
            path_and_query=f"{upstream_path}?{query}" if query else upstream_path,
            headers=out_headers,
            connect_timeout=(traffic.connect_timeout if traffic is not None else None) or self.settings.connect_timeout,
            idle_timeout=self.settings.idle_timeout,
            deadline=_deadline(request_timeout, rule.timeouts.backend_request),
            edit_response_headers=edit_response,
            verify_tls=upstream.verify_tls,
            server_hostname=upstream.sni,
            body_limit=limit,
            retry=self._retry_plan(traffic.retry, found.route.key, rule.index, upstream)
            if traffic is not None and traffic.retry is not None and not is_websocket else None,
        )
        outcome.upstream = str(plan.endpoint)
        exchange = Exchange()
        # A sandbox exchange of a verified caller is tracked while it lasts: it ends when the
        # caller loses access. Every sandbox WebSocket gets one as its tag (open_stream says why).
        stream = None
        if sandbox is not None and (is_websocket or sandbox.access is not None):
            stream = self.sandboxes.open_stream(sandbox)
        try:
            if is_websocket:
                return await self._websocket(request, plan, outcome, stream)
            if headers.get("Expect", "").lower() == "100-continue" and request.body_exists:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            response = await forward(request, plan, self.pool, exchange)
        except Refusal as e:
            if sandbox is not None and e.code == "no_endpoint":  # SPEC §4.1: DNS finds no sandbox
                raise Refusal(502, "sandbox_unresolved", "The sandbox's address could not be resolved.") from e
            raise
        finally:
            if stream is not None:
                self.sandboxes.close_stream(stream)
            if exchange.retries:
                outcome.retries = exchange.retries
                outcome.upstream = str(exchange.endpoint)  # the one that answered last
        outcome.upstream_seconds = exchange.upstream_seconds
        outcome.bytes_sent = exchange.bytes_sent
        return response

    def _retry_plan(self, retry: RetryPolicy, route_key: str, rule_index: int, upstream) -> RetryPlan:
        budget = self._retry_budgets.get((route_key, rule_index))
        if budget is None:
            budget = self._retry_budgets[(route_key, rule_index)] = RetryBudget()
        return RetryPlan(retry, budget, lambda tried: self.pool.pick_for_retry(upstream, tried))

    def _parse(self, request: web.BaseRequest, request_id: str):
        """(host, normalised path, raw query, absolute-form authority), or an error response
        for what must be refused before any routing. (The header limit was held while reading:
        server/protocol.py.)"""
        if HTTP09 in request:
            return self._error(request, 400, "bad_request", "HTTP/0.9 requests are not supported.", request_id)
        try:
            parsed = _target(request)
        except BadRequestTarget as e:
            return self._error(request, 400, "bad_request", str(e), request_id)
        transfer_encoding = request.headers.get("Transfer-Encoding")
        if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
            # RFC 9112 §6.1: a coding we do not apply would change what the body means.
            return self._error(request, 501, "not_implemented", "Only chunked transfer coding is supported.", request_id)
        return parsed

    def _upstream_headers(self, request, found: Candidate, choice, allowed, request_id: str, *,
                          host: str | None, forwarded_host: str, trusted_hops: int, to_sandbox: bool) -> CIMultiDict:
        """The client's end-to-end headers, plus this hop's, policy and filter changes."""
        if to_sandbox:
            out = end_to_end(request.headers, _DROP_TO_SANDBOX, NOT_FOR_SANDBOXES_PREFIX)
        else:
            out = end_to_end(request.headers, _DROP_TO_UPSTREAM)
        if host is not None:
            out["Host"] = host
        append_forwarded(
            out,
            client_ip=request.remote or "",
            proto="https" if found.listener.protocol == "HTTPS" else "http",
            host=forwarded_host,
            trust_incoming=trusted_hops > 0,
        )
        out["X-Request-Id"] = request_id
        if allowed is not None:
            for name in allowed.strip_headers:
                out.popall(name, None)
            for name, value in allowed.upstream_headers:
                out[name] = value
        apply_modifier(out, found.rule.filters.request_headers)
        apply_modifier(out, choice.filters.request_headers)
        return out

    def _rate_limit(self, request, traffic, out_headers, client_ip: str, route_key: str, request_id: str,
                    issuer: str | None = None):
        """X-RateLimit-* headers for the response, or the 429 that refuses the request.

        Evaluated on the upstream headers, after claimToHeaders, so a Distinct header
        selector can limit per claim (and per issuer: `issuer` of the verified principal)."""
        verdict = self.rate_limiter.check(
            traffic.key, traffic.rate_limits, revision=traffic.revision,
            headers=out_headers, client_ip=parse_ip(client_ip), method=request.method, issuer=issuer,
        )
        if verdict is None:
            return ()
        rate_headers = rate_limit_headers(verdict)
        if verdict.allowed:
            return rate_headers
        self.metrics.observe_ratelimited(route_key)
        response = self._error(request, 429, "rate_limited", "Too many requests; retry later.", request_id)
        response.headers.update(rate_headers)
        response.headers["Retry-After"] = str(max(1, verdict.retry_after))
        return response

    def _sandbox(self, request, router, found: Candidate, gateway: str, path: str, upstream_path: str,
                 allowed, policy, request_id: str, outcome: "_Outcome"):
        """A SandboxRouter backend: the sandbox to forward to, or the response that ends it (an
        awaitable for the terminal)."""
        if self.sandboxes is None:
            return self._error(request, 503, "sandboxes_unavailable", "Sandbox access is not running.", request_id)
        token = allowed.decision.token if allowed is not None and allowed.decision is not None else None
        routed = self.sandboxes.route(
            request, router, path=path, rewritten_path=upstream_path,
            claims=token.claims if token is not None else None, secured=policy is not None,
            issuer=issuer_of(token.provider, policy, token.claims) if token is not None else "",
            # who may reach which sandbox is read from the claims: without a SecurityPolicy there are none
            policy=self.policies.policies.sandbox_attached.for_rule(found.route.key, found.rule.index, gateway)
            if policy is not None else None,
            request_id=request_id, route_key=found.route.key, rule_index=found.rule.index, outcome=outcome,
        )
        return routed

    async def _preview(self, request, zone: PreviewZone, found: Candidate, gateway: str, host: str, path: str,
                       allowed, request_id: str):
        """A PreviewZone backend: the preview API, or a preview host's sandbox."""
        if self.previews is None:
            return self._error(request, 503, "previews_unavailable", "Previews are not running.", request_id)
        token = allowed.decision.token if allowed is not None and allowed.decision is not None else None
        sandbox_attached = self.policies.policies.sandbox_attached
        return await self.previews.route(
            request, zone, host=host, path=path, claims=token.claims if token is not None else None,
            # read only by the API and owner access mode, not per capability-host request
            policy=lambda: sandbox_attached.for_rule(found.route.key, found.rule.index, gateway),
            request_id=request_id, origin=lambda: self._origin(request),
        )

    async def sandbox_deleted(self, namespace: str, name: str) -> None:
        """Close what still reaches a sandbox that is gone: relayed WebSockets and terminals."""
        reason = f"sandbox {namespace}/{name} was deleted"
        await self.sockets.close_tagged(("sandbox", namespace, name), WSCloseCode.GOING_AWAY, reason)
        if self.sandboxes is not None and self.sandboxes.terminals is not None:
            await self.sandboxes.terminals.close_sandbox(namespace, name, reason)

    async def sandbox_access_changed(self, namespace: str, name: str | None) -> None:
        """The cluster changed who may reach a sandbox (every sandbox of the namespace when
        `name` is None): end the streams of callers that lost access (SPEC §5) — WebSockets
        with 1008, terminals with their shell, HTTP responses cut where they are."""
        if self.sandboxes is None:
            return
        for stream in self.sandboxes.lost_access(namespace, name):
            reason = f"access to sandbox {stream.tag[1]}/{stream.tag[2]} was withdrawn"
            if stream.terminal is not None:
                await self.sandboxes.terminals.close_session(stream.terminal, reason)
            elif not await self.sockets.close_tagged(stream, WSCloseCode.POLICY_VIOLATION, reason):
                stream.task.cancel()  # an HTTP response (or a WebSocket still in its handshake)

    async def _websocket(self, request: web.BaseRequest, plan: ForwardPlan, outcome: "_Outcome", tag=None):
        plan.deadline = None  # a WebSocket lives by its own idle timeout and maximum lifetime
        self.metrics.websocket_opened(outcome.route)
        outcome.status = 101  # replaced by the error status if the upgrade fails
        try:
            return await websocket.relay(request, plan, self.pool, self.settings.websocket, self.sockets, tag)
        finally:
            self.metrics.websocket_closed(outcome.route)

    def _redirect(self, request, found: Candidate, host: str, path: str, query: str, request_id: str):
        redirect = found.rule.filters.redirect
        listener = found.listener
        scheme, port = self.settings.public_origin(host) or (
            "https" if listener.protocol == "HTTPS" else "http",
            listener.port,
        )
        location = redirect_location(
            redirect,
            scheme=scheme,
            host=host,
            listener_port=port,
            path=path,
            query=query,
            matched_prefix=found.matched_prefix,
        )
        response = web.Response(
            status=redirect.status, headers={"Location": location, "X-Request-Id": request_id, "Server": SERVER}
        )
        apply_modifier(response.headers, found.rule.filters.response_headers)
        return response

    def _origin(self, request: web.BaseRequest) -> str:
        """The public origin clients use: --public-url, else what this request says."""
        if self.settings.public_base:
            return self.settings.public_base
        headers = request.headers
        if self.settings.trusted_hops > 0 and "X-Forwarded-Proto" in headers:
            return f"{headers['X-Forwarded-Proto']}://{headers.get('X-Forwarded-Host', headers.get('Host', ''))}"
        return f"{request.scheme}://{headers.get('Host', '')}"

    def _error(self, request: web.BaseRequest, status: int, code: str, message: str, request_id: str) -> web.Response:
        return error_response(status, code, message, request_id, accept=request.headers.get("Accept", ""))

    def _record(self, request: web.BaseRequest, request_id: str, outcome: "_Outcome", started: float) -> None:
        seconds = monotonic() - started
        route = outcome.route or UNMATCHED
        self.metrics.observe_request(route, request.method, outcome.status, seconds, outcome.upstream_seconds)
        if outcome.retries:
            self.metrics.retries.labels(route).inc(outcome.retries)
        decision = outcome.decision
        self.access_log.write(
            {
                "request_id": request_id,
                "remote": request.remote,
                "client": outcome.client,
                "method": request.method,
                "host": redact_host(outcome.host),  # a preview host is a capability
                "path": redact_path(outcome.path),  # never the query, nor a preview token: both are credentials
                "status": outcome.status,
                "route": route,
                "upstream": outcome.upstream,
                "duration_ms": round(seconds * 1000, 3),
                "upstream_ms": round(outcome.upstream_seconds * 1000, 3),
                "bytes": outcome.bytes_sent,
                "retries": outcome.retries,
            },
            "" if decision is None else f'{outcome.decision_json},"audit_id":"{decision.id}"',
        )

    async def close(self) -> None:
        await self.sockets.close_all()
        if self.sandboxes is not None and self.sandboxes.terminals is not None:
            await self.sandboxes.terminals.close()
        await self.pool.close()


class _Outcome:
    __slots__ = ("status", "route", "host", "path", "upstream", "upstream_seconds", "bytes_sent", "client", "decision",
                 "decision_json", "retries")

    def __init__(self) -> None:
        self.status = 0
        self.client = ""
        self.decision = None  # the AuditRecord of the policy decision, if a policy applied
        self.decision_json = ""  # its fields of the access log line but the audit id (enforce.decision_json)
        self.route = ""
        self.host = ""
        self.path = ""
        self.upstream = ""
        self.upstream_seconds = 0.0
        self.bytes_sent = 0
        self.retries = 0


# The client's Expect is answered here; the upstream request is sent whole.
_DROP_TO_UPSTREAM = frozenset({"expect"})
_DROP_TO_SANDBOX = _DROP_TO_UPSTREAM | NOT_FOR_SANDBOXES


def _header_bytes(request: web.BaseRequest) -> int:
    return sum(len(name) + len(value) + 4 for name, value in request.raw_headers)


def _target(request: web.BaseRequest) -> tuple[str, str, str, str | None]:
    """(host, normalised path, raw query, absolute-form authority or None) of the request;
    BadRequestTarget when malformed."""
    target = request.raw_path
    host_header = request.headers.get("Host", "")
    authority = None
    if not target.startswith("/"):
        # absolute-form (RFC 9112 §3.2.2): its authority replaces the Host header
        if not target.lower().startswith(("http://", "https://")):
            raise BadRequestTarget("unsupported request target")
        url = URL(target, encoded=True)
        host_header = authority = url.raw_authority
        target = url.raw_path_qs or "/"
    path, query = split_target(target)
    return normalize_host_cached(host_header), normalize_path(path), query, authority


def _rewrite(found: Candidate, rule_filters: Filters, backend_filters: Filters, path: str) -> tuple[str, str | None]:
    """Upstream path and Host after URLRewrite filters (rule first, then the chosen backend's)."""
    host = None
    for filters in (rule_filters, backend_filters):
        rewrite = filters.rewrite
        if rewrite is None:
            continue
        if rewrite.path is not None:
            path = modify_path(path, rewrite.path, found.matched_prefix)
        if rewrite.hostname:
            host = rewrite.hostname
    return path, host


def _deadline(request_timeout: float | None, backend_timeout: float | None) -> float | None:
    limits = [t for t in (request_timeout, backend_timeout) if t]
    return monotonic() + min(limits) if limits else None
