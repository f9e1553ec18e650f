"""API keys: minted once, stored only as SHA-256(pepper + key), checked in constant time.

Lookups are cached for a couple of seconds (positive and negative), so a valid key costs a
dictionary lookup, a flood of random keys costs at most one store query per key per window,
and a revoked key stops working on every replica within that window.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from time import monotonic
from typing import Awaitable, Callable

from gateway.secrets import SecretFile, VaultSecret, open_secret

KEY_PREFIX = "sgk_"
CACHE_SECONDS = 2.0
DEFAULT_PEPPER_FILE = "/etc/sandgate/secrets/api-key-pepper"


@dataclass(frozen=True, slots=True)
class ApiKeyPrincipal:
    key_id: str
    owner: str
    scopes: tuple[str, ...]


def pepper_secret(path: str | None = None) -> SecretFile | VaultSecret:
    """The pepper's secret file (SANDGATE_API_KEY_PEPPER_FILE), re-read when it changes. A new
    pepper changes every key's hash: rotating it retires every key issued before."""
    path = path or os.environ.get("SANDGATE_API_KEY_PEPPER_FILE", DEFAULT_PEPPER_FILE)
    return open_secret(path, "API key pepper", min_bytes=16)  # MissingSecret names it


def read_pepper(path: str | None = None) -> bytes:
    return pepper_secret(path).value()


def hash_key(pepper: bytes, key: str) -> str:
    return hashlib.sha256(pepper + key.encode()).hexdigest()


def mint_key() -> tuple[str, str]:
    """(key id, the secret key to show once). The id is part of the key, so logs can name it."""
    key_id = base64.b32encode(secrets.token_bytes(5)).decode().lower()
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    return key[len(KEY_PREFIX):].split("_", 1)[0] or None


Lookup = Callable[[str], Awaitable[object | None]]  # key hash -> stored record (id, owner, scopes)


class ApiKeyVerifier:
    def __init__(self, pepper: Callable[[], bytes], lookup: Lookup, *, cache_size: int = 10_000):
        self._pepper = pepper  # the current pepper (SecretFile.value)
        self._lookup = lookup
        self._cache: OrderedDict[str, tuple[float, ApiKeyPrincipal | None]] = OrderedDict()
        self._cache_size = cache_size

    async def verify(self, key: str) -> ApiKeyPrincipal | None:
        if len(key) > 256 or not key.isascii() or not key.startswith(KEY_PREFIX):
            return None
        digest = hash_key(self._pepper(), key)
        cached = self._cache.get(digest)
        now = monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        record = await self._lookup(digest)
        principal = None
        # The store found the record by the peppered hash; the id embedded in the key must be
        # the record's too (compared in constant time, like every comparison of key material).
        if record is not None and hmac.compare_digest(record.id.encode(), (key_id_of(key) or "").encode()):
            principal = ApiKeyPrincipal(record.id, record.owner, tuple(record.scopes))
        if len(self._cache) >= self._cache_size:
            self._cache.popitem(last=False)
        self._cache[digest] = (now + CACHE_SECONDS, principal)
        return principal
