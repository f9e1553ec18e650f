"""Request-target and Host normalisation: done once, before matching (SPEC §3.1).

The path is normalised the way RFC 3986 §6.2.2 allows and Envoy does by default: percent-encoded
unreserved characters are decoded, other escapes are upper-cased, repeated slashes are merged and
dot-segments are removed. An encoded slash (`%2F`) stays encoded, so it can never become a path
separator for matching. The upstream receives the normalised path: what was matched is what is
forwarded, so `/api/../admin` cannot reach `/admin` behind a route that only allows `/api`.
"""

from __future__ import annotations

import re

_HEX = "0123456789abcdefABCDEF"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 pchar plus "/" and the escape character; anything else in a path is malformed.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_HOST_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class BadRequestTarget(ValueError):
    """The request target or Host cannot be understood; the client gets 400."""


def split_target(target: str) -> tuple[str, str]:
    """Split an origin-form request target into (path, query) without decoding anything."""
    path, sep, query = target.partition("?")
    if "#" in query:
        query = query.partition("#")[0]
    if "#" in path:
        raise BadRequestTarget("fragment in request target")
    return path, query


def normalize_path(path: str) -> str:
    """Return the normalised form of an absolute path; raise BadRequestTarget if malformed."""
    if not path.startswith("/"):
        raise BadRequestTarget("request path must start with '/'")
    if "%" not in path and "//" not in path and "/." not in path:
        if _PATH_CHARS.fullmatch(path) is None:
            raise BadRequestTarget("invalid character in request path")
        return path
    if _PATH_CHARS.fullmatch(path) is None:
        raise BadRequestTarget("invalid character in request path")
    if "%" in path:
        path = _normalize_escapes(path)
    return _remove_dot_segments(path)


def _normalize_escapes(path: str) -> str:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise BadRequestTarget("invalid percent-escape in request path")
        decoded = chr(int(pair, 16))
        out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
        i += 3
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    segments: list[str] = []
    parts = path.split("/")
    for part in parts[1:]:
        if part == "..":
            if segments:
                segments.pop()
        elif part not in (".", ""):
            segments.append(part)
    # A trailing "/", "/." or "/.." names a directory: keep the final slash.
    trailing = parts[-1] in ("", ".", "..") and len(segments) > 0
    return "/" + "/".join(segments) + ("/" if trailing else "")


def normalize_host(host: str) -> str:
    """Lower-case the Host, drop a port and one trailing dot; raise BadRequestTarget if invalid."""
    if not host:
        raise BadRequestTarget("missing Host header")
    if host.startswith("["):  # IPv6 literal, possibly with a port
        end = host.find("]")
        if end < 0:
            raise BadRequestTarget("invalid Host header")
        rest = host[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            raise BadRequestTarget("invalid Host header")
        return host[: end + 1].lower()
    name, _, port = host.partition(":")
    if port and not (port.isdigit() and len(port) <= 5):
        raise BadRequestTarget("invalid port in Host header")
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        raise BadRequestTarget("invalid Host header")
    for label in name.split("."):
        if _HOST_LABEL.fullmatch(label) is None:
            raise BadRequestTarget("invalid Host header")
    return name


_host_cache: dict[str, str] = {}


def normalize_host_cached(host: str) -> str:
    """normalize_host with a bounded memo: clients repeat a handful of Host values."""
    found = _host_cache.get(host)
    if found is None:
        found = normalize_host(host)  # raises before anything is cached
        if len(_host_cache) >= 4096:
            _host_cache.clear()  # a flood of distinct hosts costs a recompute, never memory
        _host_cache[host] = found
    return found


def host_suffixes(host: str):
    """Yield the wildcard keys that could match `host`, most specific first.

    For "a.b.example.com": "*.b.example.com", "*.example.com", "*.com". Gateway API wildcards
    match one or more labels, never the bare suffix itself.
    """
    dot = host.find(".")
    while dot >= 0:
        yield "*" + host[dot:]
        dot = host.find(".", dot + 1)
