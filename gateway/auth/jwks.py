"""JWKS key sets: parse, cache, refresh — keeping the last good keys whatever the issuer serves.

- Keys decide the algorithm: an RSA key verifies RS*/PS*, an EC key only its curve's ES*, an
  OKP key EdDSA. Symmetric (`oct`) keys are never accepted from a JWKS: a public key set that
  carries one would let anyone holding the "public" value forge tokens.
- A refresh that fails, returns garbage or an empty set keeps the cached keys.
- Each refresh that drops a key bumps `generation`: a verified token cached by the verifier
  (gateway.auth.jwt) remembers the key and the generation it was verified under, so the cache
  never outlives the key (SPEC §2.2). A refresh that serves the same keys again keeps the same
  key objects and the same generation, so cached tokens stay cached.
- An unknown `kid` triggers at most one refetch per `min_refetch_seconds` per provider, and
  concurrent requests share it (single flight), so a flood of forged kids cannot make the
  gateway hammer the issuer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from time import monotonic
from typing import Awaitable, Callable

from jwt import PyJWK
from jwt.exceptions import PyJWKError

log = logging.getLogger("sandgate.jwks")

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}

Fetch = Callable[[str], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    algorithms: frozenset[str]
    key: object  # a cryptography public key
    material: str = ""  # the JWK as canonical JSON: the same key in two fetches compares equal


def allowed_algorithms(jwk: dict) -> frozenset[str]:
    kty = jwk.get("kty")
    if kty == "RSA":
        algs = _RSA_ALGS
    elif kty == "EC":
        alg = _EC_ALGS.get(jwk.get("crv", ""))
        algs = frozenset({alg}) if alg else frozenset()
    elif kty == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448"):
        algs = frozenset({"EdDSA"})
    else:
        return frozenset()  # oct and anything unknown: never
    declared = jwk.get("alg")
    if declared:
        return algs & {declared}
    return algs


def parse_key_set(raw: bytes | str) -> list[VerificationKey]:
    """The usable public keys of a JWKS document; invalid entries are skipped."""
    document = json.loads(raw)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys = []
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        algorithms = allowed_algorithms(jwk)
        if not algorithms:
            continue
        try:
            parsed = PyJWK(jwk, algorithm=next(iter(sorted(algorithms))))
        except (PyJWKError, ValueError, TypeError, KeyError):
            continue
        if hasattr(parsed.key, "private_bytes"):
            continue  # a private key has no business in a JWKS
        kid = jwk.get("kid")
        material = json.dumps(jwk, sort_keys=True, separators=(",", ":"), default=str)
        keys.append(VerificationKey(kid if isinstance(kid, str) else None, algorithms, parsed.key, material))
    return keys


class KeySet:
    """The keys of one provider, refreshed from `uri` every `cache_seconds`."""

    def __init__(
        self,
        provider: str,
        uri: str | None,
        fetch: Fetch | None,
        *,
        cache_seconds: float,
        inline: str | None = None,
        min_refetch_seconds: float = 5.0,
        on_refresh: Callable[[str, str], None] | None = None,
    ):
        self.provider = provider
        self.uri = uri
        self._fetch = fetch
        self.cache_seconds = cache_seconds
        self.min_refetch_seconds = min_refetch_seconds
        self._on_refresh = on_refresh or (lambda provider, result: None)
        self.keys: list[VerificationKey] = parse_key_set(inline) if inline else []
        self.generation = 0  # bumped whenever a key is removed (see holds)
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._inflight: asyncio.Future | None = None

    @property
    def loaded(self) -> bool:
        return bool(self.keys)

    def holds(self, key: VerificationKey) -> bool:
        """Whether `key` (an object of this set) is still one of its keys."""
        return any(k is key for k in self.keys)

    def _replace(self, keys: list[VerificationKey]) -> None:
        """Adopt a fetched key set, keeping the objects of keys it still has."""
        current = {k.material: k for k in self.keys}
        keys = [current.get(k.material, k) for k in keys]
        kept = {id(k) for k in keys}
        if any(id(k) not in kept for k in self.keys):
            self.generation += 1
        self.keys = keys

    def find(self, kid: str | None, algorithm: str) -> list[VerificationKey]:
        return [
            k for k in self.keys
            if algorithm in k.algorithms and (kid is None or k.kid == kid)
        ]

    async def ensure_fresh(self) -> None:
        """Refresh when the cache has expired (the call that notices waits for it)."""
        if self.uri is None:
            return
        if monotonic() - self._fetched_at >= self.cache_seconds:
            await self.refresh()

    async def refresh_for_unknown_kid(self) -> None:
        if self._inflight is not None:  # join the fetch under way (single flight)
            await asyncio.shield(self._inflight)
            return
        if self.uri is None or monotonic() - self._attempted_at < self.min_refetch_seconds:
            return
        await self.refresh()

    async def refresh(self) -> None:
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        self._inflight = asyncio.get_running_loop().create_future()
        self._attempted_at = monotonic()
        try:
            keys = parse_key_set(await self._fetch(self.uri))
            if not keys:
                raise ValueError("the key set has no usable keys")
            self._replace(keys)
            self._fetched_at = monotonic()
            self._on_refresh(self.provider, "success")
        except Exception as e:  # noqa: BLE001 - any failure keeps the last good keys
            log.warning("JWKS refresh for %s failed: %s", self.provider, e)
            # Retry no sooner than the refetch interval, however often requests ask.
            self._fetched_at = max(self._fetched_at, monotonic() - self.cache_seconds + self.min_refetch_seconds)
            self._on_refresh(self.provider, "failure")
        finally:
            self._inflight.set_result(None)
            self._inflight = None
