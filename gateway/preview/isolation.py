"""What separates a preview from the platform (SPEC §5): a preview is someone's code on its own
host, so it never receives the platform's credentials, and the cookies it sets stay on its host.
"""

from __future__ import annotations

from urllib.parse import unquote_plus


def strip_credentials(headers, cookie_names: frozenset[str]) -> None:
    headers.popall("Authorization", None)
    headers.popall("Proxy-Authorization", None)
    cookies = headers.popall("Cookie", None)
    if not cookies:
        return
    kept = [
        pair.strip() for value in cookies for pair in value.split(";")
        if pair.strip() and pair.split("=", 1)[0].strip() not in cookie_names
    ]
    if kept:
        headers["Cookie"] = "; ".join(kept)


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
    """Drop every Set-Cookie that would set a cookie named in `names` (the platform's
    credential cookies): a sandbox served on the platform's host could otherwise plant its own
    session there (login CSRF, session fixation)."""
    values = headers.popall("Set-Cookie", None)
    for value in values or ():
        if value.split(";", 1)[0].split("=", 1)[0].strip() not in names:
            headers.add("Set-Cookie", value)
