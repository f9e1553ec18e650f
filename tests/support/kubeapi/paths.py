"""URL paths of the Kubernetes API, parsed into values: no lookups, no side effects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResourcePath:
    group: str  # "" for the core group under /api
    version: str
    plural: str
    namespace: str | None = None  # None: cluster-scoped, or all namespaces for a list
    name: str | None = None
    subresource: str | None = None


@dataclass(frozen=True)
class DiscoveryPath:
    """/version, /api, /apis, /apis/{group}, /api/v1 or /apis/{group}/{version}."""

    root: str  # "version", "api" or "apis"
    group: str | None = None
    version: str | None = None


def parse_path(path: str) -> ResourcePath | DiscoveryPath | None:
    segments = [s for s in path.split("/") if s]
    match segments:
        case ["version"] | ["api"] | ["apis"]:
            return DiscoveryPath(segments[0])
        case ["api", version]:
            return DiscoveryPath("api", "", version)
        case ["apis", group]:
            return DiscoveryPath("apis", group)
        case ["apis", group, version]:
            return DiscoveryPath("apis", group, version)
        case ["api", version, *rest]:
            return _resource("", version, rest)
        case ["apis", group, version, *rest]:
            return _resource(group, version, rest)
    return None


def _resource(group: str, version: str, rest: list[str]) -> ResourcePath | None:
    match rest:
        case ["namespaces", namespace, plural, *named] if len(named) <= 2:
            return ResourcePath(group, version, plural, namespace, *named)
        case [plural, *named] if len(named) <= 2:
            return ResourcePath(group, version, plural, None, *named)
    return None
