"""Header rules of a proxy hop (RFC 9110 §7.6): what is removed, what is added, what passes."""

from __future__ import annotations

from multidict import CIMultiDict

from gateway.config.model import HeaderModifier

# RFC 9110 §7.6.1 plus the long-deprecated Proxy-Connection that clients still send.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)


def _connection_listed(headers) -> set[str]:
    listed: set[str] = set()
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                listed.add(token)
    return listed


def end_to_end(headers, extra_drop: frozenset[str] = frozenset(), drop_prefix: str | None = None) -> CIMultiDict:
    """Copy headers, keeping every end-to-end one with all its values in order; also dropping
    `extra_drop` and names starting with `drop_prefix` (lower case)."""
    drop = HOP_BY_HOP | extra_drop
    if "Connection" in headers:
        drop = drop | _connection_listed(headers)
    out = CIMultiDict()
    # One spelling per name: aiohttp's client merges differently-cased duplicates into one.
    spelling: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key not in drop and not (drop_prefix and key.startswith(drop_prefix)):
            out.add(spelling.setdefault(key, name), value)
    return out


def append_forwarded(
    headers: CIMultiDict, *, client_ip: str, proto: str, host: str, trust_incoming: bool
) -> None:
    """Add this hop's X-Forwarded-* values.

    X-Forwarded-For always gets the peer appended. X-Forwarded-Proto and -Host describe the first
    hop; a value the client sent is only believed (kept) when the peer is a trusted proxy.
    """
    previous = headers.getall("X-Forwarded-For", ())
    if previous:
        del headers["X-Forwarded-For"]
        headers["X-Forwarded-For"] = ", ".join([*previous, client_ip])
    else:
        headers["X-Forwarded-For"] = client_ip
    if not trust_incoming or "X-Forwarded-Proto" not in headers:
        headers["X-Forwarded-Proto"] = proto
    if not trust_incoming or "X-Forwarded-Host" not in headers:
        headers["X-Forwarded-Host"] = host


def apply_modifier(headers: CIMultiDict, modifier: HeaderModifier | None) -> None:
    """Gateway API header modifier: set overwrites, add appends, remove deletes."""
    if modifier is None:
        return
    for name, value in modifier.set:
        headers[name] = value
    for name, value in modifier.add:
        headers.add(_spelling(headers, name), value)
    for name in modifier.remove:
        headers.popall(name, None)


def _spelling(headers: CIMultiDict, name: str) -> str:
    """The spelling `name` already has in `headers` (see end_to_end), else `name` itself."""
    if name in headers:
        lower = name.lower()
        for existing in headers.keys():
            if existing.lower() == lower:
                return existing
    return name
