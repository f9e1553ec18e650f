"""Prometheus metrics (SPEC §6). The only module that imports prometheus_client.

Labels are route names, never raw paths or user ids. Per-request recording goes through cached
label children, so the hot path is a dictionary lookup and two additions.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, multiprocess

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("sandgate_requests", "Requests answered", ["route", "method", "code"], registry=r)
        self.duration = Histogram(
            "sandgate_request_duration_seconds", "Time to answer a request", ["route"], buckets=_BUCKETS, registry=r
        )
        self.upstream = Histogram(
            "sandgate_upstream_duration_seconds",
            "Time until the upstream's response headers arrived",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.websockets = Gauge(
            "sandgate_websocket_connections", "Open relayed WebSockets", ["route"], registry=r,
            multiprocess_mode="livesum",
        )
        self.decisions = Counter(
            "sandgate_policy_decisions", "Policy decisions", ["policy", "decision", "reason"], registry=r
        )
        self.jwks_refresh = Counter(
            "sandgate_jwks_refresh", "JWKS key set refreshes", ["provider", "result"], registry=r
        )
        self.retries = Counter(
            "sandgate_upstream_retries", "Upstream attempts made again under a retry policy", ["route"], registry=r
        )
        self.connections_rejected = Counter(
            "sandgate_connections_rejected", "Connections closed unread: over ClientTrafficPolicy connectionLimit",
            ["port"], registry=r,
        )
        self.ratelimited = Counter("sandgate_ratelimited", "Requests refused by a rate limit", ["route"], registry=r)
        self.audit_queue_depth = Gauge(
            "sandgate_audit_queue_depth", "Audit records waiting to be written", registry=r, multiprocess_mode="livesum"
        )
        self.audit_spooled = Counter(
            "sandgate_audit_spooled", "Audit records written to the local spool while the store was down", registry=r
        )
        self.audit_dropped = Counter(
            "sandgate_audit_dropped",
            "Audit records dropped: the store was down and the spool full (--audit-spool-max) or unwritable",
            registry=r,
        )
        # Every replica watches the same previews: the gauge is the same on all of them ("max").
        self.previews_active = Gauge(
            "sandgate_previews_active", "Previews with a live HTTPRoute", registry=r, multiprocess_mode="max"
        )
        self.previews_reaped = Counter(
            "sandgate_previews_reaped", "Previews deleted by the reaper", ["reason"], registry=r
        )
        self._request_children: dict[tuple[str, str, int], object] = {}
        self._duration_children: dict[str, object] = {}
        self._decision_children: dict[tuple, object] = {}
        self._upstream_children: dict[str, object] = {}

    def watch_sizes(self, rate_limiter, pool) -> None:
        """Gauges of state keyed by client input, read when scraped (no cost per request):
        `rate_limiter()` is the live LocalRateLimiter, `pool()` the live UpstreamPool. Values
        of one process: with --workers the supervisor's /metrics does not show them."""
        r = self.registry
        for name, doc, read in (
            ("sandgate_ratelimit_buckets", "Local rate-limit buckets held", lambda: rate_limiter().bucket_count),
            ("sandgate_ratelimit_key_bytes", "Characters of the local rate-limit bucket keys held",
             lambda: rate_limiter().key_bytes),
            ("sandgate_upstream_pools", "Upstream (address, port) connection pools held", lambda: pool().http.pool_count),
            ("sandgate_upstream_idle_connections", "Idle kept-alive upstream connections",
             lambda: pool().http.idle_count),
        ):
            Gauge(name, doc, registry=r, multiprocess_mode="livesum").set_function(read)

    def observe_request(self, route: str, method: str, code: int, seconds: float, upstream_seconds: float) -> None:
        key = (route, method, code)
        counter = self._request_children.get(key)
        if counter is None:
            label = method if method in KNOWN_METHODS else "OTHER"
            counter = self._request_children[key] = self.requests.labels(route, label, str(code))
        counter.inc()
        histogram = self._duration_children.get(route)
        if histogram is None:
            histogram = self._duration_children[route] = self.duration.labels(route)
        histogram.observe(seconds)
        if upstream_seconds:
            histogram = self._upstream_children.get(route)
            if histogram is None:
                histogram = self._upstream_children[route] = self.upstream.labels(route)
            histogram.observe(upstream_seconds)

    def observe_decision(self, policy: str, allowed: bool, reason: str) -> None:
        self.decision_counter(policy, allowed, reason).inc()

    def decision_counter(self, policy: str, allowed: bool, reason: str):
        """The policy_decisions_total child of these labels (kept by callers that repeat a decision)."""
        key = (policy, allowed, reason)
        counter = self._decision_children.get(key)
        if counter is None:
            counter = self._decision_children[key] = self.decisions.labels(policy, "allow" if allowed else "deny", reason)
        return counter

    def observe_ratelimited(self, route: str) -> None:
        self.ratelimited.labels(route).inc()

    def observe_jwks_refresh(self, provider: str, result: str) -> None:
        self.jwks_refresh.labels(provider, result).inc()

    def websocket_opened(self, route: str) -> None:
        self.websockets.labels(route).inc()

    def websocket_closed(self, route: str) -> None:
        self.websockets.labels(route).dec()

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
