"""Path rewrites and redirect targets, as pure functions of the matched request."""

from __future__ import annotations

from gateway.config.model import PathModifier, Redirect

_DEFAULT_PORTS = {"http": 80, "https": 443}


def replace_prefix(path: str, prefix: str, replacement: str) -> str:
    """Gateway API ReplacePrefixMatch: swap the matched path prefix (element-wise) for another.

    "/foo/bar" with prefix "/foo" and replacement "/xyz" gives "/xyz/bar"; a replacement of "/"
    or "" strips the prefix without leaving "//".
    """
    prefix = prefix.rstrip("/")
    remainder = path[len(prefix) :]
    result = replacement.rstrip("/") + remainder
    if not result.startswith("/"):
        result = "/" + result
    return result


def modify_path(path: str, modifier: PathModifier, matched_prefix: str | None) -> str:
    if modifier.kind == "ReplaceFullPath":
        return modifier.value
    # The loader only accepts ReplacePrefixMatch on PathPrefix matches.
    return replace_prefix(path, matched_prefix or "/", modifier.value)


def redirect_location(
    redirect: Redirect,
    *,
    scheme: str,
    host: str,
    listener_port: int,
    path: str,
    query: str,
    matched_prefix: str | None,
) -> str:
    """Build the Location of a RequestRedirect (Gateway API v1, GEP-726 port rules).

    No port given: with a scheme given, that scheme's well-known port; otherwise the listener's
    port. A port that is the scheme's default is left out of the URL.
    """
    new_scheme = redirect.scheme or scheme
    new_host = redirect.hostname or host
    if redirect.port is not None:
        port = redirect.port
    elif redirect.scheme:
        port = _DEFAULT_PORTS.get(redirect.scheme, listener_port)
    else:
        port = listener_port
    new_path = modify_path(path, redirect.path, matched_prefix) if redirect.path else path
    authority = new_host if port == _DEFAULT_PORTS.get(new_scheme) else f"{new_host}:{port}"
    location = f"{new_scheme}://{authority}{new_path}"
    return f"{location}?{query}" if query else location
