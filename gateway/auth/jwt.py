"""JWT verification (SPEC §2.2): keys decide the algorithm, `exp` is required, results cached.

A verified token is cached under the SHA-256 of the token (never the token itself) until its
`exp` at the latest, so a repeated token costs a dictionary lookup, not a signature check. What
requests read from its claims (scopes, subject, claimToHeaders values) is derived once, then.
The cache never outlives the key that verified a token either (SPEC §2.2): an entry remembers
its key and the key set's generation, and once a refresh has removed the key the entry is gone.

A principal is its issuer and subject together (`principal`, "ISSUER#SUBJECT"): two issuers
may both have a user "alice", and they are not the same caller.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from time import time
from typing import Callable

import jwt as pyjwt
from jwt import exceptions as jwt_errors

from gateway.auth.jwks import KeySet, VerificationKey
from gateway.policy.authz import claim_value, scopes_of
from gateway.policy.model import JwtProvider

ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "ES256K", "EdDSA"})
MAX_TOKEN_BYTES = 16 * 1024
MEMO_SIZE = 128  # entries per cached token (VerifiedToken.remember)
MEMO_KEY_CHARS = 256  # a memo key with more characters (a long path) is not remembered
# The verified-token cache is bounded by bytes too: each entry is charged twice its token's
# length (the token's claims) plus the most its memo can hold, and all entries together at
# most CACHE_BYTES. Tokens are at most 16 KiB, so hostile large tokens fill it in fewer entries.
CACHE_BYTES = 256 * 1024 * 1024
MEMO_ALLOWANCE = MEMO_SIZE * MEMO_KEY_CHARS
API_KEY_PROVIDER = "api-key"  # the provider (and issuer) of API-key principals


class TokenError(Exception):
    """A token that must be refused; `reason` is a stable kebab-case code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    provider: str
    claims: dict
    expires_at: float
    fingerprint: str  # first 16 hex chars of the token's SHA-256: safe to log and audit
    upstream_headers: tuple[tuple[str, str], ...] = ()  # claimToHeaders values (claim_headers)
    scopes: frozenset[str] = field(init=False)  # of the `scope` / `scp` claim
    subject: str | None = field(init=False)  # `sub`; unique only together with `issuer`
    issuer: str | None = field(init=False)  # `iss` (API keys: API_KEY_PROVIDER)
    # "ISSUER#SUBJECT" ('#' and '%' of the issuer percent-encoded, so the first '#' splits it):
    # who the caller is, for audit records, logs and anything keyed by caller.
    principal: str | None = field(init=False)
    # What policy code derives from this token and keeps as long as the token is cached
    # (gateway.policy.decision keeps decisions here, gateway.server.enforce what recording an
    # allowed request needs); not part of the token's value. Written through remember().
    memo: dict = field(init=False, default_factory=dict, compare=False, repr=False)

    def remember(self, key: tuple, value: object) -> None:
        """memo[key] = value, keeping at most MEMO_SIZE entries of at most MEMO_KEY_CHARS: a
        client walking many paths with one token starts the memo afresh rather than growing
        it, and one sending long paths is not remembered at all."""
        if sum(len(part) for part in key if isinstance(part, str)) > MEMO_KEY_CHARS:
            return
        if len(self.memo) >= MEMO_SIZE:
            self.memo.clear()
        self.memo[key] = value

    def __post_init__(self) -> None:
        object.__setattr__(self, "scopes", frozenset(scopes_of(self.claims)))
        subject = str(self.claims.get("sub", ""))[:256] or None
        issuer = API_KEY_PROVIDER if self.provider == API_KEY_PROVIDER else self.claims.get("iss")
        issuer = issuer[:256] if isinstance(issuer, str) and issuer else None
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "issuer", issuer)
        object.__setattr__(self, "principal", principal_of(issuer, subject) if subject is not None else None)


def principal_of(issuer: str | None, subject: str) -> str:
    """"ISSUER#SUBJECT", a `#` or `%` in the issuer percent-encoded: the one spelling of a
    principal in audit records and logs."""
    return (issuer or "").replace("%", "%25").replace("#", "%23") + "#" + subject


class _Cached:
    """A verified token with the key that verified it, and the key set's generation when that
    key was last seen in it."""

    __slots__ = ("token", "key_set", "key", "generation", "cost")

    def __init__(self, token: VerifiedToken, key_set: KeySet | None, key: VerificationKey | None, cost: int = 0):
        self.token = token
        self.key_set = key_set
        self.key = key
        self.generation = key_set.generation if key_set is not None else 0
        self.cost = cost  # bytes charged against CACHE_BYTES

    def usable(self, now: float) -> bool:
        if self.token.expires_at <= now:
            return False
        key_set = self.key_set
        if key_set is None or self.generation == key_set.generation:
            return True  # the hot path: one comparison
        if key_set.holds(self.key):  # a key was removed, but not this one
            self.generation = key_set.generation
            return True
        return False


def claim_headers(providers: tuple[JwtProvider, ...], provider: str, claims: dict) -> tuple[tuple[str, str], ...]:
    """claimToHeaders of the providers named `provider`: (header, value) for each claim that is
    a scalar whose text is a valid header value."""
    out = []
    for p in providers:
        if p.name != provider:
            continue
        for claim, header in p.claim_to_headers:
            value = claim_value(claims, claim)
            if isinstance(value, (str, int, float, bool)):
                text = str(value)
                if "\r" not in text and "\n" not in text:
                    out.append((header, text))
    return tuple(out)


_ERRORS = (
    (jwt_errors.ExpiredSignatureError, "token-expired", "The token has expired."),
    (jwt_errors.ImmatureSignatureError, "token-not-yet-valid", "The token is not valid yet."),
    (jwt_errors.InvalidAudienceError, "token-audience-mismatch", "The token is not meant for this audience."),
    (jwt_errors.InvalidIssuerError, "token-issuer-mismatch", "The token's issuer is not trusted here."),
    (jwt_errors.MissingRequiredClaimError, "token-claim-missing", "The token lacks a required claim."),
    (jwt_errors.InvalidSignatureError, "token-signature-invalid", "The token's signature is invalid."),
)


class JwtVerifier:
    def __init__(self, key_set_for: Callable[[JwtProvider], KeySet], *, leeway_seconds: float = 30.0,
                 cache_size: int = 10_000, cache_bytes: int = CACHE_BYTES):
        self.key_set_for = key_set_for
        self.leeway = leeway_seconds
        self._cache: OrderedDict[tuple, _Cached] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self.cached_bytes = 0  # the cost of every entry held

    def cached(self, token: str, providers: tuple[JwtProvider, ...], required_audience: str | None = None) -> VerifiedToken | None:
        """The token as verified earlier, if it is cached and not expired; no signature check."""
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            return None
        cached = self._cache.get(self._key(token, providers, required_audience))
        return cached.token if cached is not None and cached.usable(time()) else None

    async def verify(self, token: str, providers: tuple[JwtProvider, ...], required_audience: str | None = None) -> VerifiedToken:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("token-too-large", "The token is too large.")
        if not token.isascii():  # a JWT is base64url and dots; raw header bytes that are not UTF-8 arrive as surrogates
            raise TokenError("token-malformed", "The token cannot be parsed.")
        key = self._key(token, providers, required_audience)
        cached = self._cache.get(key)
        if cached is not None:
            if cached.usable(time()):
                return cached.token
            self._forget(key)
        entry = await self._verify(token, providers, required_audience, key[2].hex()[:16])
        entry.cost = 2 * len(token) + MEMO_ALLOWANCE
        if key in self._cache:  # verified meanwhile by a concurrent request
            self._forget(key)
        while self._cache and (len(self._cache) >= self._cache_size
                               or self.cached_bytes + entry.cost > self._cache_bytes):
            self._forget(next(iter(self._cache)))
        self._cache[key] = entry
        self.cached_bytes += entry.cost
        return entry.token

    def _forget(self, key: tuple) -> None:
        self.cached_bytes -= self._cache.pop(key).cost

    @staticmethod
    def _key(token: str, providers: tuple[JwtProvider, ...], required_audience: str | None) -> tuple:
        # Per provider settings, not just names: the providers tuple of a loaded policy lives as
        # long as this verifier (a reload makes a new one), so its identity is a cheap key.
        return (id(providers), required_audience, hashlib.sha256(token.encode()).digest())

    async def _verify(self, token, providers, required_audience, fingerprint) -> _Cached:
        try:
            header = pyjwt.get_unverified_header(token)
            unverified = pyjwt.decode(token, options={"verify_signature": False})
        except jwt_errors.PyJWTError:
            raise TokenError("token-malformed", "The token cannot be parsed.") from None
        algorithm = header.get("alg")
        if algorithm not in ASYMMETRIC:
            raise TokenError("token-algorithm-refused", "The token's signing algorithm is refused.")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
            raise TokenError("token-malformed", "The token's key id is invalid.")
        issuer = unverified.get("iss")
        candidates = [p for p in providers if p.issuer is None or p.issuer == issuer]
        if not candidates:
            raise TokenError("token-issuer-mismatch", "The token's issuer is not trusted here.")
        last_error = TokenError("token-key-unknown", "No key of the issuer matches the token.")
        for provider in candidates:
            key_set = self.key_set_for(provider)
            await key_set.ensure_fresh()
            keys = key_set.find(kid, algorithm)
            if not keys:
                await key_set.refresh_for_unknown_kid()
                keys = key_set.find(kid, algorithm)
            for verification_key in keys:
                try:
                    claims = pyjwt.decode(
                        token,
                        key=verification_key.key,
                        algorithms=[algorithm],
                        audience=list(provider.audiences) or None,
                        issuer=provider.issuer,
                        leeway=self.leeway,
                        options={"require": ["exp"], "verify_aud": bool(provider.audiences)},
                    )
                except jwt_errors.PyJWTError as e:
                    last_error = _token_error(e)
                    continue
                if float(claims["exp"]) <= time():
                    # The leeway is for clock skew on nbf/iat; an expired token is expired.
                    raise TokenError("token-expired", "The token has expired.")
                if required_audience is not None and required_audience not in _audiences(claims):
                    raise TokenError("token-audience-mismatch", "The token is not meant for this resource.")
                verified = VerifiedToken(provider.name, claims, float(claims["exp"]), fingerprint,
                                         claim_headers(providers, provider.name, claims))
                return _Cached(verified, key_set, verification_key)
        raise last_error


def _audiences(claims: dict) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud or [] if isinstance(a, str)]


def _token_error(error: Exception) -> TokenError:
    for kind, reason, message in _ERRORS:
        if isinstance(error, kind):
            return TokenError(reason, message)
    return TokenError("token-invalid", "The token is invalid.")
