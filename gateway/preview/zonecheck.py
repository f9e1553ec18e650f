"""`sandgate check`'s warning for a preview zone that shares its registrable domain with a
platform hostname (SPEC §5): browsers scope cookies to a registrable domain ("site"), so a
preview's JavaScript could set cookies the platform then reads (cookie tossing, session fixation),
and the platform's domain-wide cookies would reach the previews.

The registrable domain is the public suffix plus one label. Without shipping the Public Suffix
List this knows the common multi-label suffixes (country second levels such as co.uk, and hosting
suffixes such as github.io); any other suffix is taken to be the last label, which errs towards
warning: `a.example.co.nz` and `b.example.co.nz` sharing `co.nz` would be warned about too.
"""

from __future__ import annotations

import ipaddress

from yarl import URL

from gateway.config.model import Config, PreviewZone

# Second levels under which registrations happen (public suffixes of two labels or more).
_COUNTRY_SECOND_LEVELS = frozenset(
    f"{second}.{country}"
    for country, seconds in {
        "uk": "co ac gov ltd me net nhs org plc police sch",
        "au": "com net org edu gov asn id",
        "nz": "co net org ac govt geek gen maori school",
        "jp": "co ne or ac ad ed go gr lg",
        "kr": "co ne or ac go re",
        "br": "com net org gov edu art blog",
        "in": "co net org firm gen ind ac edu gov res",
        "za": "co net org web gov ac edu",
        "cn": "com net org gov edu ac",
        "hk": "com net org gov edu idv",
        "tw": "com net org gov edu idv",
        "sg": "com net org gov edu per",
        "my": "com net org gov edu name",
        "mx": "com net org gob edu",
        "ar": "com net org gob edu int",
        "tr": "com net org gov edu biz info gen web",
        "il": "co net org ac gov muni",
        "id": "co net or ac go web my biz",
        "th": "co net or ac go in mi",
        "ua": "com net org gov edu in",
        "ru": "com net org",
        "pl": "com net org info biz",
        "es": "com nom org gob edu",
        "fr": "asso com gouv nom",
    }.items()
    for second in seconds.split()
)
_HOSTING = frozenset({
    "github.io", "gitlab.io", "pages.dev", "workers.dev", "netlify.app", "vercel.app", "herokuapp.com",
    "azurewebsites.net", "azurestaticapps.net", "cloudfront.net", "appspot.com", "web.app", "firebaseapp.com",
    "blogspot.com", "ngrok.io", "ngrok-free.app", "onrender.com", "fly.dev", "s3.amazonaws.com",
})
PUBLIC_SUFFIXES = _COUNTRY_SECOND_LEVELS | _HOSTING


def registrable_domain(host: str) -> str | None:
    """The public suffix plus one label; None for an IP address, a single label or a suffix."""
    host = host.lower().rstrip(".").removeprefix("*.")
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    labels = host.split(".")
    for size in (3, 2):  # the longest known suffix first
        if len(labels) > size and ".".join(labels[-size:]) in PUBLIC_SUFFIXES:
            return ".".join(labels[-size - 1:])
    if len(labels) >= 2 and ".".join(labels[-2:]) not in PUBLIC_SUFFIXES:
        return ".".join(labels[-2:])
    return None


def platform_hosts(config: Config, policies, public_url: str | None) -> set[str]:
    """Host names the platform answers on or signs in at: route and listener hostnames, the public
    URL, and JWT issuers and key sets of the SecurityPolicies."""
    hosts = {h for route in config.routes if not _serves_previews_only(route) for h in route.hostnames}
    hosts |= {listener.hostname for listener in config.listeners if listener.hostname}
    urls = [public_url] if public_url else []
    for policy in policies.security:
        for provider in (policy.jwt.providers if policy.jwt else ()):
            urls += [u for u in (provider.issuer, provider.jwks_uri) if u]
    for text in urls:
        try:
            host = URL(text).host
        except ValueError:
            continue
        if host:
            hosts.add(host)
    return {h.lower().removeprefix("*.") for h in hosts}


def _serves_previews_only(route) -> bool:
    """A route of preview hosts (`*.{zone}`): its hostnames are the zone's, not the platform's."""
    backends = [c for rule in route.rules for c in rule.backends]
    return bool(backends) and all(isinstance(c.special, PreviewZone) for c in backends)


def zone_warnings(config: Config, policies, public_url: str | None) -> list[str]:
    warnings = []
    for zone in config.served(PreviewZone).values():
        site = registrable_domain(zone.zone)
        if site is None:
            continue
        shared = sorted(
            host for host in platform_hosts(config, policies, public_url) if registrable_domain(host) == site
        )
        if shared:
            where = f"{zone.source}: " if zone.source is not None else ""
            warnings.append(
                f"{where}PreviewZone {zone.key}: zone {zone.zone} shares its registrable domain {site} with the "
                f"platform's {', '.join(shared)}: cookies of one would reach the other; give previews a domain of their own"
            )
    return warnings
