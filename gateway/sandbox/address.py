"""Which sandbox a request names: from `X-Sandbox-*` headers (§4.1) or from the
`/gateway/v1/sandboxes/{namespace}/{name}/...` path (§4.2, §4.3), strictly validated.

Everything here is hostile input. A name is a DNS-1123 label and nothing else (no trailing
newline: `fullmatch`, never `$`), a port is 1-65535 in plain ASCII digits; anything else is a
`BadSandboxRequest` (400) before any lookup happens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.config.model import SandboxRouter

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,5}", re.ASCII)
_SECONDS = re.compile(r"[0-9]{1,7}(\.[0-9]{1,6})?", re.ASCII)

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
        timeout=_timeout(timeout) if timeout is not None else None,
    )


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


def _timeout(value: str) -> float:
    if _SECONDS.fullmatch(value) is None or float(value) <= 0:
        raise BadSandboxRequest(f"{HEADER_TIMEOUT} must be a positive number of seconds.")
    return float(value)


def _single(headers, name: str) -> str | None:
    values = headers.getall(name, ())
    if len(values) > 1:
        raise BadSandboxRequest(f"{name} must be sent once.")
    return values[0] if values else None
