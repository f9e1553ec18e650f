"""The discovery answers clients read first: /version, /api, /apis and the resource lists."""

from __future__ import annotations

from .catalog import Catalog, ResourceType
from .paths import DiscoveryPath
from .status import path_not_found

VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0",
    "gitCommit": "sandgate-kube-api-double",
    "gitTreeState": "clean",
    "buildDate": "2025-04-23T00:00:00Z",
    "goVersion": "go1.24.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def answer(catalog: Catalog, path: DiscoveryPath, server_address: str) -> dict:
    groups = catalog.groups()
    if path.root == "version":
        return VERSION
    if path.root == "api" and path.version is None:
        address = {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [address]}
    if path.root == "apis" and path.group is None:
        listed = [_group(name, types) for name, types in sorted(groups.items()) if name]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": listed}
    types = groups.get(path.group or "", [])
    if path.version is None and types and path.group:
        return {"kind": "APIGroup", "apiVersion": "v1", **_group(path.group, types)}
    served = [t for t in types if path.version in t.versions]
    if not served:
        raise path_not_found()
    group_version = served[0].api_version(path.version)
    resources = [entry for t in served for entry in _resources(t, path.version)]
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def _group(name: str, types: list[ResourceType]) -> dict:
    versions = sorted({v for t in types for v in t.versions}, reverse=True)
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    preferred = types[0].storage_version
    preferred_version = {"groupVersion": f"{name}/{preferred}", "version": preferred}
    return {"name": name, "versions": listed, "preferredVersion": preferred_version}


def _resources(rtype: ResourceType, version: str) -> list[dict]:
    base = {"singularName": rtype.kind.lower(), "namespaced": rtype.namespaced, "kind": rtype.kind}
    entries = [{"name": rtype.plural, **base, "verbs": _VERBS}]
    if rtype.has_status(version):
        entries.append({"name": f"{rtype.plural}/status", **base, "verbs": ["get", "patch", "update"]})
    if rtype.kind == "Pod":
        entries.append({"name": "pods/exec", **base, "kind": "PodExecOptions", "verbs": ["create", "get"]})
    return entries
