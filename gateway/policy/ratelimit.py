"""Local rate limits (BackendTrafficPolicy rateLimit.local), Envoy Gateway semantics.

Each rule is a token bucket of `requests` per `unit`. A rule applies to a request when all its
clientSelectors match; a `Distinct` selector (header value or source IP) gives every distinct
value a bucket of its own. A request is refused when any applicable bucket is empty. Distinct
buckets are kept in an LRU of bounded size, so a flood of distinct values costs a bounded
amount of memory (at worst it forgets old buckets, i.e. errs on the side of allowing).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from time import monotonic
from typing import Mapping

UNIT_SECONDS = {"Second": 1, "Minute": 60, "Hour": 3600, "Day": 86400, "Week": 604800, "Month": 2592000, "Year": 31536000}


@dataclass(frozen=True, slots=True)
class HeaderSelector:
    name: str  # lower case
    kind: str  # Exact | RegularExpression | Distinct
    value: str | None = None
    pattern: re.Pattern[str] | None = None
    invert: bool = False


@dataclass(frozen=True, slots=True)
class SourceSelector:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    distinct: bool = False
    invert: bool = False


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    requests: int
    unit_seconds: int
    headers: tuple[HeaderSelector, ...] = ()
    source: SourceSelector | None = None
    methods: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RateVerdict:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int = 0


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float):
        self.tokens = tokens
        self.stamp = stamp


class LocalRateLimiter:
    def __init__(self, max_buckets_per_rule: int = 100_000):
        self._buckets: dict[tuple, OrderedDict] = {}
        self._max = max_buckets_per_rule

    def check(
        self,
        policy_id: str,
        rules: tuple[RateLimitRule, ...],
        *,
        headers: Mapping[str, str],
        client_ip,
        method: str,
        now: float | None = None,
    ) -> RateVerdict | None:
        """None when no rule applies; otherwise the tightest verdict (tokens are taken only
        when every applicable bucket has one)."""
        now = monotonic() if now is None else now
        applicable: list[tuple[RateLimitRule, _Bucket]] = []
        for index, rule in enumerate(rules):
            key = _bucket_key(rule, headers, client_ip, method)
            if key is None:
                continue
            applicable.append((rule, self._bucket((policy_id, index), key, rule, now)))
        if not applicable:
            return None
        for rule, bucket in applicable:
            _refill(bucket, rule, now)
        empty = [(rule, bucket) for rule, bucket in applicable if bucket.tokens < 1]
        if empty:
            rule, bucket = min(empty, key=lambda rb: rb[1].tokens)
            rate = rule.requests / rule.unit_seconds
            wait = (1 - bucket.tokens) / rate
            return RateVerdict(False, rule.requests, 0, _ceil(rule.unit_seconds - bucket.tokens / rate), _ceil(wait))
        for _, bucket in applicable:
            bucket.tokens -= 1
        rule, bucket = min(applicable, key=lambda rb: rb[1].tokens)
        rate = rule.requests / rule.unit_seconds
        return RateVerdict(True, rule.requests, int(bucket.tokens), _ceil((rule.requests - bucket.tokens) / rate))

    def _bucket(self, rule_id: tuple, key: tuple, rule: RateLimitRule, now: float) -> _Bucket:
        buckets = self._buckets.get(rule_id)
        if buckets is None:
            buckets = self._buckets[rule_id] = OrderedDict()
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self._max:
                buckets.popitem(last=False)
            bucket = buckets[key] = _Bucket(float(rule.requests), now)
        else:
            buckets.move_to_end(key)
        return bucket


def _refill(bucket: _Bucket, rule: RateLimitRule, now: float) -> None:
    rate = rule.requests / rule.unit_seconds
    bucket.tokens = min(float(rule.requests), bucket.tokens + (now - bucket.stamp) * rate)
    bucket.stamp = now


def _ceil(seconds: float) -> int:
    return max(0, math.ceil(seconds - 1e-9))


def _bucket_key(rule: RateLimitRule, headers: Mapping[str, str], client_ip, method: str) -> tuple | None:
    """The bucket this request counts against, or None when the rule does not apply."""
    if rule.methods and method not in rule.methods:
        return None
    key: list = []
    for selector in rule.headers:
        value = headers.get(selector.name)
        if selector.kind == "Distinct":
            if value is None:
                return None
            key.append(value)
            continue
        if selector.kind == "RegularExpression":
            hit = value is not None and selector.pattern.fullmatch(value) is not None
        else:
            hit = value == selector.value
        if hit == selector.invert:
            return None
    if rule.source is not None:
        inside = client_ip is not None and client_ip in rule.source.network
        if inside == rule.source.invert:
            return None
        if rule.source.distinct:
            key.append(str(client_ip))
    return tuple(key)
