"""Applying the SecurityPolicy of a matched rule to a live request.

The decision itself is pure (gateway.policy.decision); this module turns it into what HTTP
needs: 401/403 with RFC 6750 / RFC 9728 challenges, CORS preflight answers and response
headers, Origin checks for MCP and WebSocket, headers for the upstream, metrics and the
decision log line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from time import monotonic
from typing import Callable

from aiohttp import web

from gateway.audit import AuditRecord
from gateway.audit.rollup import Slot
from gateway.policy.decision import Decision, RequestFacts, evaluate, www_authenticate
from gateway.policy.model import Cors, SecurityPolicy
from gateway.policy.runtime import METADATA_PATH, PolicyRuntime, metadata_document, origin_allowed
from gateway.preview.tokens import redact_path
from gateway.refusal import Refusal, denied
from gateway.server.errors import SERVER, refusal_response


@dataclass(slots=True)
class Allowed:
    decision: Decision | None
    upstream_headers: tuple[tuple[str, str], ...] = ()  # claimToHeaders values
    strip_headers: tuple[str, ...] = ()  # every claimToHeaders name: never taken from the client
    response_headers: tuple[tuple[str, str], ...] = ()  # CORS


@dataclass(slots=True)
class Repeat:
    """An allowed decision kept with its verified token for one route, method and path, with
    what recording it again needs: a repeated request costs a lookup and, in rollup mode, an
    increment in its open rollup slot (else a tuple), not a new evaluation, audit record and
    log fields."""

    policy: SecurityPolicy
    allowed: Allowed
    record: AuditRecord  # the first request's: again() makes the next ones
    log_json: str  # decision_json(record)
    counter: object  # its policy_decisions_total child
    slot: Slot | None = None  # its rollup slot (AuditLog.decided), while that is open


def record_decision(audit, record: AuditRecord, rule_index: int | None) -> tuple[Slot | None, object]:
    """Record the decision of route rule `rule_index`; returns its rollup slot (None in `every`
    mode) and what the access log names as its audit id (`.id`): the record itself when it is
    stored on its own, else the rollup slot, whose id the rollup record will have."""
    slot = audit.decided(record, rule_index)
    return slot, (record if slot is None or slot.count == 0 else slot)


def metadata_response(policies: PolicyRuntime, path: str, origin: str) -> web.Response | None:
    """RFC 9728 metadata for an MCP route protected by JWT, served by the gateway itself."""
    resource = policies.mcp_by_metadata_path.get(path)
    if resource is None:
        return None
    body = json.dumps(metadata_document(resource, origin)).encode()
    return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "max-age=300", "Server": SERVER})


async def enforce(
    policies: PolicyRuntime,
    policy: SecurityPolicy,
    request: web.BaseRequest,
    *,
    route_key: str,
    rule_index: int,
    path: str,
    query: str,
    origin_of: Callable[[web.BaseRequest], str],  # the public origin clients use (read only when needed)
    client_ip: str,
    is_websocket: bool,
    request_id: str,
    host: str,
    metrics,
    audit,
    outcome,
) -> Allowed | web.Response:
    headers = request.headers
    client_origin = headers.get("Origin")
    method = request.method
    enforcement = policies.enforcement(policy)
    repeat_source = enforcement.repeat_source
    # Not for browsers' requests (CORS and Origin checks) nor MCP routes (their own checks).
    if repeat_source is not None and client_origin is None and route_key not in policies.mcp_by_route:
        name, prefix = repeat_source
        value = headers.get(name)
        if value is not None and value[:len(prefix)].lower() == prefix:
            started = monotonic()
            token = policies.verifier.cached(value[len(prefix):].strip(), policy.jwt.providers)
            repeat = token.memo.get((id(policy), route_key, method, path)) if token is not None else None
            if repeat is not None and repeat.policy is policy:  # the id of a live policy is its own
                repeat.counter.inc()
                slot = repeat.slot
                if slot is not None and slot.open:
                    slot.again(request_id)
                    outcome.decision = slot
                else:
                    record = repeat.record.again(request_id, host, int((monotonic() - started) * 1_000_000 + 0.5) / 1000)
                    repeat.slot, outcome.decision = record_decision(audit, record, rule_index)
                outcome.decision_json = repeat.log_json
                return repeat.allowed
    cors = policy.cors
    mcp = policies.mcp_by_route.get(route_key)
    origin = origin_of(request)
    if client_origin:
        if cors is not None and method == "OPTIONS" and "Access-Control-Request-Method" in headers:
            if origin_allowed(cors, client_origin, origin):
                return _preflight(cors, client_origin, headers)
        if (mcp is not None or is_websocket) and not origin_allowed(cors, client_origin, origin):
            metrics.observe_decision(policies.enforcement(policy).key, False, "origin-not-allowed")
            return refusal_response(denied("origin-not-allowed", "This Origin may not call this route."),
                                    request_id, headers.get("Accept", ""))
    facts = RequestFacts(method, path, query, headers, client_ip, None if mcp is None else origin + mcp.path)
    started = monotonic()
    decision = await evaluate(policy, facts, policies.verifier, policies.api_keys)
    latency_ms = int((monotonic() - started) * 1_000_000 + 0.5) / 1000  # to the µs; round() is slower
    reasons = decision.reasons
    token = decision.token
    counter = metrics.decision_counter(enforcement.key, decision.allowed, reasons[0].code if reasons else "allowed")
    counter.inc()
    record = AuditRecord(
        kind="decision",
        request_id=request_id,
        route=route_key,
        policy=enforcement.key,
        revision=policy.revision,
        principal=None if token is None else token.principal,  # issuer#subject
        method=method,
        host=host,
        path=redact_path(path),  # a preview API path can carry a token
        decision="allow" if decision.allowed else "deny",
        reasons=tuple([v.code for v in reasons]) if reasons else (),
        latency_ms=latency_ms,
        # fingerprints only: a record never holds a token or an API key
        detail={} if token is None else {"credential": token.fingerprint},
    )
    slot, outcome.decision = record_decision(audit, record, rule_index)  # the access log line of this request carries the decision
    outcome.decision_json = log_json = decision_json(record)
    if not decision.allowed:
        challenge = None
        if decision.status in (400, 401) or (decision.status == 403 and mcp is not None):
            metadata = origin + METADATA_PATH + mcp.path if mcp is not None else None
            challenge = www_authenticate(decision, "sandgate", metadata)
        code = "unauthorized" if decision.status == 401 else ("bad_request" if decision.status == 400 else "policy_violation")
        refusal = Refusal(decision.status, code, decision.reasons[0].message, reason=decision.reasons[0].code,
                          violations=[v.as_dict() for v in decision.reasons],
                          headers={"WWW-Authenticate": challenge} if challenge else None)
        return refusal_response(refusal, request_id, headers.get("Accept", ""))
    response_headers = _cors_headers(cors, client_origin) if cors and client_origin and origin_allowed(cors, client_origin, origin) else ()
    allowed = Allowed(decision, decision.upstream_headers, enforcement.strip_headers, response_headers)
    if repeat_source is not None and client_origin is None and mcp is None and token is not None and decision.token_sent:
        # Keyed like decision.py's memo entries plus the route: the two kinds never collide.
        token.remember((id(policy), route_key, method, path), Repeat(policy, allowed, record, log_json, counter, slot))
    return allowed


def decision_json(record: AuditRecord) -> str:
    """The policy decision of a request as fields of its access log line (credentials as
    fingerprints), but the audit id: encoded JSON members, each after a comma."""
    fields = {
        "policy": record.policy,
        "revision": record.revision,
        "decision": record.decision,
        "reasons": list(record.reasons),
        "principal": record.principal,
        "credential": record.detail.get("credential"),
    }
    return "," + json.dumps(fields, separators=(",", ":"))[1:-1]


def _preflight(cors: Cors, client_origin: str, headers) -> web.Response:
    response = web.Response(status=204, headers={"Server": SERVER})
    out = response.headers
    out["Access-Control-Allow-Origin"] = client_origin
    out["Vary"] = "Origin"
    methods = cors.allow_methods or (headers.get("Access-Control-Request-Method", ""),)
    out["Access-Control-Allow-Methods"] = ", ".join(methods)
    if cors.allow_headers:
        out["Access-Control-Allow-Headers"] = ", ".join(cors.allow_headers)
    if cors.max_age is not None:
        out["Access-Control-Max-Age"] = str(cors.max_age)
    if cors.allow_credentials:
        out["Access-Control-Allow-Credentials"] = "true"
    return response


def _cors_headers(cors: Cors, client_origin: str) -> tuple[tuple[str, str], ...]:
    out = [("Access-Control-Allow-Origin", client_origin), ("Vary", "Origin")]
    if cors.allow_credentials:
        out.append(("Access-Control-Allow-Credentials", "true"))
    if cors.expose_headers:
        out.append(("Access-Control-Expose-Headers", ", ".join(cors.expose_headers)))
    return tuple(out)


def client_address(request: web.BaseRequest, trusted_hops: int) -> str:
    """The client's IP: the peer, or with N trusted proxy hops in front, the Nth address from
    the right of X-Forwarded-For (what the outermost trusted proxy saw)."""
    peer = request.remote or ""
    if trusted_hops <= 0:
        return peer
    forwarded = [a.strip() for v in request.headers.getall("X-Forwarded-For", ()) for a in v.split(",") if a.strip()]
    if len(forwarded) < trusted_hops:
        return peer
    return forwarded[-trusted_hops]


def rate_limit_headers(verdict) -> tuple[tuple[str, str], ...]:
    return (
        ("X-RateLimit-Limit", str(verdict.limit)),
        ("X-RateLimit-Remaining", str(verdict.remaining)),
        ("X-RateLimit-Reset", str(verdict.reset_seconds)),
    )
