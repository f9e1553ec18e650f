"""What separates a preview from the platform (SPEC §5): a preview is someone's code on its own
host, so it never receives the platform's credentials, the cookies it sets stay on its host, and
nothing it links to learns its URL (which holds the token).

Cookies a browser sends carry no domain, so "only the cookies the preview host set" is kept by
two means together: the zone is a registrable domain apart from the platform's (`sandgate check`
warns otherwise), so the platform's cookies are never sent to a preview; and, whatever the
setup, every cookie named like a platform credential is dropped on the way in: the cookies any
SecurityPolicy reads a credential from, and the session cookies of Envoy Gateway's OIDC filter
(`BearerToken-…`, `IdToken-…`, `OauthHMAC-…`...). Other cookies are the preview's own.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

# Envoy Gateway's OIDC cookies: NAME-<hash of the policy>
OIDC_COOKIE_PREFIXES = tuple(f"{name}-" for name in (
    "BearerToken", "IdToken", "RefreshToken", "OauthHMAC", "OauthExpires", "OauthNonce", "CodeVerifier",
))


def is_platform_cookie(name: str, credential_cookies: frozenset[str]) -> bool:
    return name in credential_cookies or name.startswith(OIDC_COOKIE_PREFIXES)


def strip_credentials(headers, cookie_names: frozenset[str]) -> None:
    """The request to a preview: no platform credentials, in headers or in cookies."""
    headers.popall("Authorization", None)
    headers.popall("Proxy-Authorization", None)
    cookies = headers.popall("Cookie", None)
    if not cookies:
        return
    kept = [
        pair.strip() for value in cookies for pair in value.split(";")
        if pair.strip() and not is_platform_cookie(pair.split("=", 1)[0].strip(), cookie_names)
    ]
    if kept:
        headers["Cookie"] = "; ".join(kept)


def isolate_response(headers) -> None:
    """The response of a preview: its cookies for its own host only, and no Referer of its URL
    (the token) sent to anything it links to or loads."""
    host_only_cookies(headers)
    headers["Referrer-Policy"] = "no-referrer"


def host_only_cookies(headers) -> None:
    """Drop the Domain attribute of every Set-Cookie: a preview could otherwise set a cookie for
    the whole zone (its sibling previews) or the platform's parent domain."""
    values = headers.popall("Set-Cookie", None)
    for value in values or ():
        parts = [p for p in value.split(";") if p.split("=", 1)[0].strip().lower() != "domain"]
        headers.add("Set-Cookie", ";".join(parts))


def without_params(query: str, names: frozenset[str]) -> str:
    """The raw query string without the parameters named in `names`, compared as the policy
    reads them (parse_qsl: percent-decoded, '+' as space), the rest kept byte for byte."""
    if not names or not query:
        return query
    kept = [part for part in query.split("&") if unquote_plus(part.split("=", 1)[0]) not in names]
    return "&".join(kept)


def without_set_cookies(headers, names: frozenset[str]) -> None:
    """Drop every Set-Cookie that would set a platform cookie (named in `names`, the platform's
    credential cookies, or an OIDC session's): a sandbox served on the platform's host could
    otherwise plant its own session there (login CSRF, session fixation)."""
    values = headers.popall("Set-Cookie", None)
    for value in values or ():
        if not is_platform_cookie(value.split(";", 1)[0].split("=", 1)[0].strip(), names):
            headers.add("Set-Cookie", value)
