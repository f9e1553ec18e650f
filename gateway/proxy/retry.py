"""When a failed upstream attempt is tried again (BackendTrafficPolicy `retry`), as Envoy decides.

Only requests that may safely run twice are retried (RFC 9110 §9.2.2 idempotent methods), only
when their body is small enough to keep for a replay, and only before anything of the response
went to the client. The trigger names are Envoy's `retry_on` values:

- connect-failure, reset-before-request: no connection could be made (nothing was sent);
- reset: no response at all (connect failure, disconnect, reset, invalid response, per-try timeout);
- 5xx: any 5xx response, or no response; gateway-error: 502, 503, 504, or no response;
- retriable-4xx: 409; retriable-status-codes: the policy's httpStatusCodes;
- cancelled, deadline-exceeded, internal, resource-exhausted, unavailable: that `grpc-status`
  in the response headers;
- refused-stream is an HTTP/2 signal; upstreams are spoken to in HTTP/1.1, so it never fires.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import aiohttp
from multidict import CIMultiDict

from gateway.config.model import Endpoint
from gateway.policy.model import RetryPolicy
from gateway.proxy.h1client import IDEMPOTENT_METHODS, ConnectFailed

# Larger bodies (and chunked ones, whose size is unknown) stream through once, never kept.
REPLAYABLE_BODY = 64 * 1024

_ON_CONNECT_FAILURE = frozenset({"connect-failure", "reset-before-request", "reset", "5xx", "gateway-error"})
_ON_NO_RESPONSE = frozenset({"reset", "5xx", "gateway-error"})
_GATEWAY_ERRORS = frozenset({502, 503, 504})
_GRPC_TRIGGERS = {"1": "cancelled", "4": "deadline-exceeded", "8": "resource-exhausted", "13": "internal",
                  "14": "unavailable"}


@dataclass(slots=True)
class RetryPlan:
    policy: RetryPolicy
    budget: RetryBudget  # of the route rule
    next_endpoint: Callable[[set[Endpoint]], Endpoint]  # picks for a retry, avoiding those tried if it can


def attempts_allowed(retry: RetryPolicy | None, method: str, body_exists: bool, content_length: int | None) -> int:
    """How many times this request may be sent: 1 unless it is safe and cheap to send again."""
    if retry is None or method not in IDEMPOTENT_METHODS:
        return 1
    if body_exists and (content_length is None or content_length > REPLAYABLE_BODY):
        return 1
    return retry.attempts


def retry_on_failure(retry: RetryPolicy, exc: BaseException) -> bool:
    """Whether an attempt that ended without a response is tried again."""
    if isinstance(exc, ConnectFailed):
        triggers = _ON_CONNECT_FAILURE
    elif isinstance(exc, (TimeoutError, ConnectionError, aiohttp.ClientError)):
        triggers = _ON_NO_RESPONSE
    else:
        return False
    return not triggers.isdisjoint(retry.triggers)


def retry_on_response(retry: RetryPolicy, status: int, headers: CIMultiDict) -> bool:
    """Whether a response is thrown away and the request tried again."""
    triggers = retry.triggers
    if status >= 500 and ("5xx" in triggers or (status in _GATEWAY_ERRORS and "gateway-error" in triggers)):
        return True
    if status == 409 and "retriable-4xx" in triggers:
        return True
    if status in retry.status_codes and "retriable-status-codes" in triggers:
        return True
    grpc_status = headers.get("grpc-status")
    return grpc_status is not None and _GRPC_TRIGGERS.get(grpc_status.strip()) in triggers


def pause_before(retry: RetryPolicy, retry_number: int) -> float:
    """Envoy's fully jittered exponential back-off: retry n waits up to (2^n - 1) × base."""
    ceiling = min(retry.max_interval, ((1 << min(retry_number, 32)) - 1) * retry.base_interval)
    return random.uniform(0, ceiling)


class RetryBudget:
    """Retries under way at once for one route rule's backends, capped (Envoy Gateway's default
    circuitBreaker.maxParallelRetries), so a failing upstream does not get its load multiplied."""

    __slots__ = ("limit", "in_flight")

    def __init__(self, limit: int = 1024):
        self.limit = limit
        self.in_flight = 0

    def take(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def give_back(self) -> None:
        self.in_flight -= 1
