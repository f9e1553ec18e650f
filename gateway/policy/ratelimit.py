"""Local rate limits (BackendTrafficPolicy rateLimit.local), Envoy Gateway semantics.

Each rule is a token bucket of `requests` per `unit`. A rule applies to a request when all its
clientSelectors match; a `Distinct` selector (header value or source IP) gives every distinct
value a bucket of its own. A request is refused when any applicable bucket is empty.

Distinct values come from the client (a header value may be 64 KiB long), so buckets are
bounded by count and by bytes: a key longer than KEY_DIGEST_ABOVE characters is kept as its
SHA-256, each rule keeps at most `max_buckets_per_rule` buckets and all rules together
`max_buckets` (least recently used out first). A flood of distinct values costs a bounded
amount of memory; at worst it forgets old buckets, i.e. errs on the side of allowing. Buckets
belong to a policy revision: when a reload brings a new revision, the old one's buckets go.

A Distinct header selector counts per caller: when the request carries a verified principal,
its issuer is part of the key, so user "alice" of one issuer never shares a bucket with "alice"
of another (claimToHeaders puts bare claim values in headers).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from time import monotonic
from typing import Mapping

KEY_DIGEST_ABOVE = 64  # characters of a bucket key kept as they are; a longer key becomes a digest

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
    __slots__ = ("tokens", "stamp", "size")

    def __init__(self, tokens: float, stamp: float, size: int):
        self.tokens = tokens
        self.stamp = stamp
        self.size = size  # characters of its key, for the byte count


class LocalRateLimiter:
    def __init__(self, max_buckets_per_rule: int = 50_000, *, max_buckets: int = 200_000):
        self._buckets: dict[tuple, OrderedDict] = {}  # (policy, revision, rule index) -> LRU
        self._revisions: dict[str, str] = {}  # policy -> the revision buckets are kept for
        self._max_per_rule = max_buckets_per_rule
        self._max = max_buckets
        self.bucket_count = 0
        self.key_bytes = 0  # characters of every bucket key held (each at most KEY_DIGEST_ABOVE)

    def check(
        self,
        policy_id: str,
        rules: tuple[RateLimitRule, ...],
        *,
        headers: Mapping[str, str],
        client_ip,
        method: str,
        revision: str = "",
        issuer: str | None = None,
        now: float | None = None,
    ) -> RateVerdict | None:
        """None when no rule applies; otherwise the tightest verdict (tokens are taken only
        when every applicable bucket has one). `issuer`: of the request's verified principal."""
        now = monotonic() if now is None else now
        if self._revisions.get(policy_id, revision) != revision:
            self._drop_other_revisions(policy_id, revision)
        self._revisions[policy_id] = revision
        applicable: list[tuple[RateLimitRule, _Bucket]] = []
        for index, rule in enumerate(rules):
            key = _bucket_key(rule, headers, client_ip, method, issuer)
            if key is None:
                continue
            applicable.append((rule, self._bucket((policy_id, revision, index), key, rule, now)))
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

    def _bucket(self, rule_id: tuple, key: tuple | bytes, rule: RateLimitRule, now: float) -> _Bucket:
        buckets = self._buckets.get(rule_id)
        if buckets is None:
            buckets = self._buckets[rule_id] = OrderedDict()
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self._max_per_rule:
                self._forget(buckets)
            elif self.bucket_count >= self._max:
                self._forget(buckets if buckets else max(self._buckets.values(), key=len))
            size = len(key) if isinstance(key, bytes) else sum(len(part) for part in key)
            bucket = buckets[key] = _Bucket(float(rule.requests), now, size)
            self.bucket_count += 1
            self.key_bytes += size
        else:
            buckets.move_to_end(key)
        return bucket

    def _forget(self, buckets: OrderedDict) -> None:
        """Drop the least recently used bucket of `buckets`."""
        _, bucket = buckets.popitem(last=False)
        self.bucket_count -= 1
        self.key_bytes -= bucket.size

    def _drop_other_revisions(self, policy_id: str, revision: str) -> None:
        """A reload changed the policy: the buckets of its earlier revision are never read
        again. (A request still finishing on the old revision starts its buckets afresh.)"""
        for rule_id in [r for r in self._buckets if r[0] == policy_id and r[1] != revision]:
            buckets = self._buckets.pop(rule_id)
            self.bucket_count -= len(buckets)
            self.key_bytes -= sum(b.size for b in buckets.values())


def _refill(bucket: _Bucket, rule: RateLimitRule, now: float) -> None:
    rate = rule.requests / rule.unit_seconds
    bucket.tokens = min(float(rule.requests), bucket.tokens + (now - bucket.stamp) * rate)
    bucket.stamp = now


def _ceil(seconds: float) -> int:
    return max(0, math.ceil(seconds - 1e-9))


def _bucket_key(rule: RateLimitRule, headers: Mapping[str, str], client_ip, method: str,
                issuer: str | None = None) -> tuple | bytes | None:
    """The bucket this request counts against, or None when the rule does not apply: a tuple
    of short strings, or the SHA-256 of a long key."""
    if rule.methods and method not in rule.methods:
        return None
    key: list = []
    distinct_header = False
    for selector in rule.headers:
        value = headers.get(selector.name)
        if selector.kind == "Distinct":
            if value is None:
                return None
            key.append(value)
            distinct_header = True
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
    if distinct_header and issuer is not None:
        key.append(issuer)
    if sum(len(part) for part in key) <= KEY_DIGEST_ABOVE:
        return tuple(key)
    digest = hashlib.sha256()
    for part in key:  # length-prefixed: ("ab", "c") and ("a", "bc") stay apart
        encoded = part.encode("utf-8", "surrogateescape")
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return digest.digest()
