"""Which sandbox a request names: from `X-Sandbox-*` headers (§4.1) or from the
`/gateway/v1/sandboxes/{namespace}/{name}/...` path (§4.2, §4.3), strictly validated.

Everything here is hostile input. A name is a DNS-1123 label and nothing else (no trailing
newline: `fullmatch`, never `$`), a port is 1-65535 in plain ASCII digits, a timeout a positive
decimal number as Python's `str(float)` writes it; anything else is a `BadSandboxRequest` (400)
before any lookup happens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.config.model import SandboxRouter

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,5}", re.ASCII)
# What the agent-sandbox clients send: `str(timeout)` of a Python int or float, so `60`,
# `65.123456789`, `3.3333333333333335`, `1e-05`, `1e+16`. No sign, no `nan`/`inf`, no `0x`,
# no `_`, no spaces, no other digits than ASCII (`float()` takes all of those).
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?", re.ASCII)
MAX_TIMEOUT_CHARS = 32
# Above every timeout a router can mean (a year); only a value that `float()` would turn into
# infinity needs it when the router sets no timeout of its own.
MAX_TIMEOUT_SECONDS = 365 * 24 * 3600.0

HEADER_ID = "X-Sandbox-ID"
HEADER_NAMESPACE = "X-Sandbox-Namespace"
HEADER_PORT = "X-Sandbox-Port"
HEADER_TIMEOUT = "X-Sandbox-Timeout"
API_PREFIX = "/gateway/v1/sandboxes/"
ADDRESS_HEADERS = (HEADER_ID, HEADER_NAMESPACE, HEADER_PORT, HEADER_TIMEOUT)  # all that from_headers reads


class BadSandboxRequest(Exception):
    """The request names a sandbox in a way that must be refused with 400."""


@dataclass(frozen=True, slots=True, eq=False)  # identity: parsed addresses are cached and reused
class SandboxAddress:
    namespace: str
    name: str
    port: int | None  # None for the terminal
    timeout: float | None = None  # X-Sandbox-Timeout, seconds
    terminal: bool = False
    path: str | None = None  # port proxy: the path after the prefix; headers: the request's own


def from_headers(headers, router: SandboxRouter) -> SandboxAddress:
    name = _single(headers, HEADER_ID)
    if name is None:
        raise BadSandboxRequest(f"{HEADER_ID} is required.")
    namespace = _single(headers, HEADER_NAMESPACE)
    port = _single(headers, HEADER_PORT)
    timeout = _single(headers, HEADER_TIMEOUT)
    return SandboxAddress(
        namespace=check_namespace(namespace if namespace is not None else router.default_namespace, router),
        name=check_label(name, HEADER_ID),
        port=check_port(port, HEADER_PORT) if port is not None else router.default_port,
        timeout=check_timeout(timeout, router) if timeout is not None else None,
    )


class HeaderAddresses:
    """`from_headers` once per distinct set of raw header values: the address, or the message of
    the 400 as a plain string. Never the exception itself: a raised exception's traceback holds
    the frames of the request that raised it, and re-raising a kept one chains every later
    request's frames onto it, so a cache of them keeps requests alive by the thousand.

    Bounded by count and by bytes: values longer than any valid address (63 + 63 + 5 + 32
    characters) or repeated headers are parsed every time and never kept."""

    MAX_KEY_CHARS = 256

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        # Values carry the router they were made for: a request that raced a reload cannot leave
        # an entry that a router with the same name but other settings would then use.
        self._entries: dict[tuple, tuple[SandboxRouter, SandboxAddress | str]] = {}

    def clear(self) -> None:
        self._entries.clear()

    def parse(self, headers, router: SandboxRouter) -> SandboxAddress | str:
        """The address the headers name, or why they are a 400."""
        getall = headers.getall
        key = (router.key, tuple(getall(HEADER_ID, ())), tuple(getall(HEADER_NAMESPACE, ())),
               tuple(getall(HEADER_PORT, ())), tuple(getall(HEADER_TIMEOUT, ())))
        cached = self._entries.get(key)
        if cached is not None and cached[0] is router:
            return cached[1]
        try:
            parsed: SandboxAddress | str = from_headers(headers, router)
        except BadSandboxRequest as e:
            parsed = str(e)
        values = key[1:]
        if all(len(v) <= 1 for v in values) and sum(len(v[0]) for v in values if v) <= self.MAX_KEY_CHARS:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # a flood of distinct values costs a re-parse, never memory
            self._entries[key] = (router, parsed)
        return parsed


def from_path(path: str, router: SandboxRouter) -> SandboxAddress | None:
    """The sandbox of a `/gateway/v1/sandboxes/...` path; None when the path is not one of
    the gateway's sandbox endpoints (404)."""
    if not path.startswith(API_PREFIX):
        return None
    parts = path[len(API_PREFIX):].split("/", 4)
    if len(parts) < 3:
        return None
    namespace, name, what = parts[0], parts[1], parts[2]
    if what == "terminal" and len(parts) == 3:
        return SandboxAddress(check_namespace(namespace, router), check_label(name, "sandbox name"), None, terminal=True)
    if what == "ports" and len(parts) >= 4:
        rest = "/" + parts[4] if len(parts) == 5 else "/"
        return SandboxAddress(
            check_namespace(namespace, router), check_label(name, "sandbox name"), check_port(parts[3], "port"), path=rest
        )
    return None


def check_label(value: str, what: str) -> str:
    if _LABEL.fullmatch(value) is None:
        raise BadSandboxRequest(f"{what} must be a DNS-1123 label (lower-case letters, digits and '-', at most 63).")
    return value


def check_namespace(value: str, router: SandboxRouter) -> str:
    check_label(value, "The sandbox namespace")
    if value not in router.allowed_namespaces:
        raise BadSandboxRequest(f"Namespace {value} is not open to sandbox access.")
    return value


def check_port(value: str, what: str) -> int:
    if _DIGITS.fullmatch(value) is None or not 1 <= int(value) <= 65535:
        raise BadSandboxRequest(f"{what} must be a port number from 1 to 65535 in plain digits.")
    return int(value)


def check_timeout(value: str, router: SandboxRouter) -> float:
    """Seconds, capped at the router's timeout: the header may lower it, never raise it."""
    if len(value) > MAX_TIMEOUT_CHARS or _SECONDS.fullmatch(value) is None:
        raise BadSandboxRequest(f"{HEADER_TIMEOUT} must be a positive number of seconds "
                                f"(digits, '.', an exponent; at most {MAX_TIMEOUT_CHARS} characters).")
    seconds = float(value)  # finite or +inf (`1e999`): the pattern has no sign, nan or inf
    if seconds <= 0:  # `0`, `0.0`, or so small it is 0 (`1e-999`)
        raise BadSandboxRequest(f"{HEADER_TIMEOUT} must be a positive number of seconds.")
    return min(seconds, router.timeout or MAX_TIMEOUT_SECONDS)


def _single(headers, name: str) -> str | None:
    values = headers.getall(name, ())
    if len(values) > 1:
        raise BadSandboxRequest(f"{name} must be sent once.")
    return values[0] if values else None
