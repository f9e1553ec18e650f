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
# What could hold a token after it: any run of 26 or more letters and digits, in any case. A
# token with a letter added, upper-cased or followed by `;x` is refused by the API, but gives
# the token back to whoever reads the log.
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9]{26,}", re.ASCII)


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
    """A path fit for logs and audit records: after `/previews/` (the preview API's
    `/gateway/v1/previews/{token}...`), whatever could hold a token replaced by its fingerprint.
    Costs one substring search for every other path."""
    start = path.find(API_SEGMENT)
    if start < 0:
        return path
    start += len(API_SEGMENT)
    return path[:start] + _TOKEN_LIKE.sub(lambda m: fingerprint(m.group(0).lower()), path[start:])
