"""Which listeners a route attaches to, and under which hostnames (Gateway API v1).

A route attaches to a listener named by one of its parentRefs (sectionName and port narrow the
choice) when the listener admits the route's namespace and their hostnames intersect. The
intersection is the hostname set the route serves on that listener: a route hostname that falls
under a wildcard listener keeps its own name; a wildcard route under a more specific listener
takes the listener's name.
"""

from __future__ import annotations

from gateway.config.model import Listener, Route

ANY_HOST = ""  # the route serves every host the listener accepts


def wildcard_covers(wildcard: str, host: str) -> bool:
    """True when `*.example.com` covers `host` (one or more labels before the suffix)."""
    suffix = wildcard[1:]  # ".example.com"
    return host.endswith(suffix) and len(host) > len(suffix)


def intersect(listener_host: str | None, route_hosts: tuple[str, ...]) -> list[str]:
    """Effective hostnames of a route on a listener; empty list = no intersection."""
    if not route_hosts:
        return [listener_host or ANY_HOST]
    if listener_host is None:
        return list(route_hosts)
    result: list[str] = []
    for host in route_hosts:
        if host == listener_host:
            result.append(host)
        elif listener_host.startswith("*.") and host.startswith("*."):
            # The narrower wildcard of the two is what both accept.
            if host.endswith(listener_host[1:]):
                result.append(host)
            elif listener_host.endswith(host[1:]):
                result.append(listener_host)
        elif listener_host.startswith("*."):
            if wildcard_covers(listener_host, host):
                result.append(host)
        elif host.startswith("*."):
            if wildcard_covers(host, listener_host):
                result.append(listener_host)
    return sorted(set(result), key=result.index)


def admits(listener: Listener, route: Route) -> bool:
    if listener.allowed_namespaces == "All":
        return True
    if listener.allowed_namespaces == "Same":
        return listener.gateway_namespace == route.namespace
    return False  # namespace selectors need namespace labels, which a file does not carry


def attachments(route: Route, listeners: tuple[Listener, ...]) -> list[tuple[Listener, list[str]]]:
    """The (listener, effective hostnames) pairs this route serves on."""
    found: dict[tuple[str, str], tuple[Listener, list[str]]] = {}
    for parent in route.parents:
        for listener in listeners:
            if listener.gateway != parent.gateway:
                continue
            if parent.section_name is not None and parent.section_name != listener.name:
                continue
            if parent.port is not None and parent.port != listener.port:
                continue
            if not admits(listener, route):
                continue
            hosts = intersect(listener.hostname, route.hostnames)
            if hosts:
                found[(listener.gateway, listener.name)] = (listener, hosts)
    return list(found.values())
