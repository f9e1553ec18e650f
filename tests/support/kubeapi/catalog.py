"""The resource types the double serves: core Services and Pods, and every CRD in gateway/schemas."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

# The vendored copies: CI has only the repository checkout, not /work/shared.
SCHEMA_DIR = Path(__file__).resolve().parents[3] / "gateway" / "schemas"

_OBJECT_META_FIELDS = frozenset({"metadata.name", "metadata.namespace"})


@dataclass(frozen=True)
class ResourceType:
    """One REST resource. Built-ins carry no schema: the client's models give their shape."""

    group: str
    kind: str
    plural: str
    namespaced: bool
    storage_version: str
    schemas: Mapping[str, Mapping | None]  # served version -> openAPIV3Schema
    status_versions: frozenset[str]  # versions that declare the status subresource
    builtin: bool = False
    field_labels: frozenset[str] = field(default=_OBJECT_META_FIELDS)

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(self.schemas)

    def has_status(self, version: str) -> bool:
        return version in self.status_versions

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    @property
    def group_resource(self) -> str:
        """How errors name the resource: `services`, `sandboxes.agents.x-k8s.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_kind(self) -> str:
        """How Invalid errors name the kind: `Service`, `Sandbox.agents.x-k8s.io`."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def tracks_generation(self) -> bool:
        # Services never got metadata.generation; Pods and custom resources have it.
        return self.kind != "Service"

    @property
    def allows_unconditional_update(self) -> bool:
        # The custom resource strategy insists on metadata.resourceVersion in a PUT; core types do not.
        return self.builtin

    @property
    def returns_deleted_object(self) -> bool:
        # Core storage returns the deleted object; custom resources answer a Success Status.
        return self.builtin


def _core(kind: str, plural: str, *field_labels: str) -> ResourceType:
    return ResourceType(
        group="",
        kind=kind,
        plural=plural,
        namespaced=True,
        storage_version="v1",
        schemas={"v1": None},
        status_versions=frozenset({"v1"}),
        builtin=True,
        field_labels=_OBJECT_META_FIELDS | set(field_labels),
    )


_SERVICE = _core("Service", "services", "spec.clusterIP", "spec.type")
_POD = _core(
    "Pod", "pods", "spec.nodeName", "spec.restartPolicy", "spec.serviceAccountName", "status.phase", "status.podIP"
)


class Catalog:
    """Looks resource types up by URL (group, version, plural) or by object (apiVersion, kind)."""

    def __init__(self, types: Iterable[ResourceType]):
        self.types = tuple(types)
        self._by_path = {(t.group, v, t.plural): t for t in self.types for v in t.versions}
        self._by_kind = {(t.api_version(v), t.kind): (t, v) for t in self.types for v in t.versions}

    def resolve(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_path.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> tuple[ResourceType, str]:
        try:
            return self._by_kind[(api_version, kind)]
        except KeyError:
            raise KeyError(f"the double serves no {kind} in {api_version}") from None

    def groups(self) -> dict[str, list[ResourceType]]:
        grouped: dict[str, list[ResourceType]] = {}
        for rtype in self.types:
            grouped.setdefault(rtype.group, []).append(rtype)
        return grouped


def resource_type_of_crd(crd: Mapping) -> ResourceType:
    spec = crd["spec"]
    served = [v for v in spec["versions"] if v.get("served", True)]
    return ResourceType(
        group=spec["group"],
        kind=spec["names"]["kind"],
        plural=spec["names"]["plural"],
        namespaced=spec["scope"] == "Namespaced",
        storage_version=next(v["name"] for v in spec["versions"] if v.get("storage")),
        schemas={v["name"]: v["schema"]["openAPIV3Schema"] for v in served},
        status_versions=frozenset(v["name"] for v in served if "status" in (v.get("subresources") or {})),
    )


def _crds(schema_dir: Path) -> Iterable[Mapping]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser reads 40k lines 10x faster
    for path in sorted(schema_dir.rglob("*.yaml")):
        with path.open() as stream:
            for document in yaml.load_all(stream, Loader=loader):
                if document and document.get("kind") == "CustomResourceDefinition":
                    yield document


@cache
def load_catalog(schema_dir: Path = SCHEMA_DIR) -> Catalog:
    """Read once per process; the schemas are shared read-only by every double."""
    return Catalog([_SERVICE, _POD, *(resource_type_of_crd(crd) for crd in _crds(schema_dir))])
