"""Preview tokens and hosts (SPEC §5).

A token is 128 random bits in lowercase base32 (26 characters); the host is
`{token}-preview.{zone}`, a single DNS label below the zone so one wildcard certificate covers
every preview. The token is the capability: it is only ever logged as a fingerprint.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from functools import lru_cache

SUFFIX = "-preview"
_TOKEN = re.compile(r"[a-z2-7]{26}", re.ASCII)
API_SEGMENT = "/previews/"  # of /gateway/v1/previews/{token}[/keepalive]
# A token-shaped segment after it, in any case: an upper-cased token is no capability, but
# lower-casing it again is all it takes to make it one.
_API_TOKEN = re.compile(r"(?<=/previews/)[a-z2-7]{26}(?=/|$)", re.ASCII | re.IGNORECASE)


def new_token() -> str:
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def is_token(value: str) -> bool:
    return _TOKEN.fullmatch(value) is not None


def host_for(token: str, zone: str) -> str:
    return f"{token}{SUFFIX}.{zone}"


def token_from_host(host: str, zone: str) -> str | None:
    """The token of a preview host of `zone`, or None when the host is not one."""
    label, dot, rest = host.partition(".")
    if not dot or rest != zone or not label.endswith(SUFFIX):
        return None
    token = label[: -len(SUFFIX)]
    return token if is_token(token) else None


def fingerprint(token: str) -> str:
    """What logs, metrics and audit records carry instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def object_name(token: str) -> str:
    """The Service's and the HTTPRoute's name (a DNS-1035 label: starts with a letter)."""
    return f"preview-{token}"


@lru_cache(maxsize=4096)  # called per request; hosts repeat
def redact_host(host: str) -> str:
    """A host fit for logs: a preview host's token replaced by its fingerprint."""
    if SUFFIX + "." not in host:
        return host
    label, dot, rest = host.partition(".")
    token = label[: -len(SUFFIX)] if label.endswith(SUFFIX) else ""
    return f"{fingerprint(token)}{SUFFIX}{dot}{rest}" if is_token(token) else host


def redact_path(path: str) -> str:
    """A path fit for logs and audit records: a token-shaped segment of the preview API
    (`/gateway/v1/previews/{token}...`) replaced by the token's fingerprint. Costs one
    substring test for every other path."""
    if API_SEGMENT not in path:
        return path
    return _API_TOKEN.sub(lambda m: fingerprint(m.group(0).lower()), path)
