"""The REST verbs with a real API server's semantics, over the store.

System metadata, generation, the status subresource, optimistic concurrency, finalizers and
garbage collection of dependents all live here; HTTP lives in server.py.
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from . import field_errors as fe
from .catalog import Catalog, ResourceType
from .patch import apply_patch
from .selectors import FieldSelector, LabelSelector
from .status import already_exists, bad_request, conflict, internal_error, invalid, not_found
from .store import Store
from .validation import admit, initial_status

# Metadata only the server writes: whatever a client sends there is replaced.
_SERVER_METADATA = ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds")
_GENERATE_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's: no vowels, no look-alikes


@dataclass(frozen=True)
class Written:
    obj: dict
    warnings: list[str]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Registry:
    def __init__(self, catalog: Catalog, store: Store):
        self.catalog = catalog
        self.store = store
        self._types = {t.group_resource: t for t in catalog.types}

    # ----- reads

    def get(self, rtype: ResourceType, version: str, namespace: str | None, name: str) -> dict:
        return self.present(rtype, version, self._current(rtype, namespace, name))

    def list(
        self,
        rtype: ResourceType,
        version: str,
        namespace: str | None,
        labels: LabelSelector = LabelSelector(),
        fields: FieldSelector = FieldSelector(),
    ) -> list[dict]:
        scope = namespace if rtype.namespaced else None
        return [
            self.present(rtype, version, obj)
            for _, obj in self.store.items(rtype.group_resource, scope)
            if labels.matches(obj["metadata"].get("labels")) and fields.matches(obj)
        ]

    def present(self, rtype: ResourceType, version: str, obj: dict) -> dict:
        """A copy as seen through `version`: served versions differ only in their label here."""
        shown = copy.deepcopy(obj)
        shown["apiVersion"] = rtype.api_version(version)
        return shown

    # ----- writes

    def create(
        self,
        rtype: ResourceType,
        version: str,
        namespace: str | None,
        body: object,
        *,
        field_validation: str = "Warn",
        dry_run: bool = False,
    ) -> Written:
        obj = self._envelope(rtype, version, namespace, body)
        metadata = obj["metadata"]
        if metadata.get("resourceVersion"):
            raise internal_error("resourceVersion should not be set on objects to be created")
        if not metadata.get("name") and metadata.get("generateName"):
            suffix = "".join(random.choices(_GENERATE_NAME_ALPHABET, k=5))
            metadata["name"] = metadata["generateName"] + suffix
        for key in (*_SERVER_METADATA, "managedFields", "selfLink"):
            metadata.pop(key, None)
        if rtype.has_status(version):
            obj.pop("status", None)
            if (status := initial_status(rtype)) is not None:
                obj["status"] = status
        warnings = admit(
            rtype, version, obj, None, field_validation=field_validation, neighbours=self._neighbours(rtype, None)
        )
        if self.store.get(rtype.group_resource, metadata.get("namespace", ""), metadata["name"]):
            raise already_exists(rtype, metadata["name"])
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = now()
        if rtype.tracks_generation:
            metadata["generation"] = 1
        obj["apiVersion"] = rtype.api_version(rtype.storage_version)
        stored = obj if dry_run else self.store.write(rtype.group_resource, obj)
        return Written(self.present(rtype, version, stored), warnings)

    def replace(
        self,
        rtype: ResourceType,
        version: str,
        namespace: str | None,
        name: str,
        body: object,
        *,
        subresource: str | None = None,
        field_validation: str = "Warn",
        dry_run: bool = False,
    ) -> Written:
        current = self._current(rtype, namespace, name)
        obj = self._envelope(rtype, version, namespace, body)
        self._check_name(obj, name)
        self._check_resource_version(rtype, obj, current, required=not rtype.allows_unconditional_update)
        return self._update(rtype, version, current, obj, subresource, field_validation, dry_run)

    def patch(
        self,
        rtype: ResourceType,
        version: str,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: bytes,
        *,
        subresource: str | None = None,
        field_validation: str = "Warn",
        dry_run: bool = False,
    ) -> Written:
        current = self._current(rtype, namespace, name)
        # Custom resources have no Go struct with patch strategies: the server refuses strategic merge.
        patched = apply_patch(self.present(rtype, version, current), content_type, patch, strategic=rtype.builtin)
        obj = self._envelope(rtype, version, namespace, patched)
        self._check_name(obj, name)
        self._check_resource_version(rtype, obj, current, required=False)
        return self._update(rtype, version, current, obj, subresource, field_validation, dry_run)

    def delete(
        self,
        rtype: ResourceType,
        version: str,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        preconditions: dict | None = None,
        dry_run: bool = False,
    ) -> tuple[dict, bool]:
        """The object as deleted (or as now terminating), and whether it is gone."""
        current = self._current(rtype, namespace, name)
        self._check_preconditions(rtype, current, preconditions or {})
        if dry_run:
            return self.present(rtype, version, current), True
        obj, gone = self._delete(rtype, current, propagation)
        return self.present(rtype, version, obj), gone

    # ----- the rules behind the verbs

    def _current(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self.store.get(rtype.group_resource, namespace if rtype.namespaced else "", name)
        if obj is None:
            raise not_found(rtype, name)
        return obj

    def _envelope(self, rtype: ResourceType, version: str, namespace: str | None, body: object) -> dict:
        """The body as an object of this type in this namespace, or the 400 the server answers."""
        if not isinstance(body, dict):
            raise bad_request(f"the body of the request must be a JSON object, not {type(body).__name__}")
        obj = copy.deepcopy(body)
        api_version = rtype.api_version(version)
        if not rtype.builtin and not obj.get("kind"):
            raise bad_request(f"Object 'Kind' is missing in '{_short(body)}'")
        if obj.setdefault("apiVersion", api_version) != api_version:
            raise bad_request(
                f"the API version in the data ({obj['apiVersion']}) does not match the expected API version "
                f"({api_version})"
            )
        if obj.setdefault("kind", rtype.kind) != rtype.kind:
            raise bad_request(f"the kind in the data ({obj['kind']}) does not match the expected kind ({rtype.kind})")
        metadata = obj.get("metadata")
        if metadata is None:
            metadata = obj["metadata"] = {}
        if not isinstance(metadata, dict):
            raise bad_request(f'{rtype.kind} in version "{version}" cannot be handled as a {rtype.kind}: bad metadata')
        if rtype.namespaced:
            if metadata.setdefault("namespace", namespace) != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
        else:
            metadata.pop("namespace", None)
        return obj

    @staticmethod
    def _check_name(obj: dict, name: str) -> None:
        if obj["metadata"].get("name") != name:
            raise bad_request(
                f"the name of the object ({obj['metadata'].get('name')}) does not match the name on the URL ({name})"
            )

    @staticmethod
    def _check_resource_version(rtype: ResourceType, obj: dict, current: dict, *, required: bool) -> None:
        sent = obj["metadata"].get("resourceVersion")
        if not sent and required:
            error = fe.invalid("metadata.resourceVersion", 0, "must be specified for an update")
            raise invalid(rtype, current["metadata"]["name"], [error])
        if sent and sent != current["metadata"]["resourceVersion"]:
            raise conflict(rtype, current["metadata"]["name"])

    @staticmethod
    def _check_preconditions(rtype: ResourceType, current: dict, preconditions: dict) -> None:
        for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted, actual = preconditions.get(field), current["metadata"][field]
            if wanted and wanted != actual:
                why = f"Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {actual}"
                raise conflict(rtype, current["metadata"]["name"], why)

    def _update(
        self,
        rtype: ResourceType,
        version: str,
        current: dict,
        obj: dict,
        subresource: str | None,
        field_validation: str,
        dry_run: bool,
    ) -> Written:
        has_status = rtype.has_status(version)
        if subresource == "status":
            # Through /status only the status changes: spec and metadata stay as stored.
            status, obj = obj.get("status"), copy.deepcopy(current)
            obj.pop("status", None)
            if status is not None:
                obj["status"] = status
        elif has_status:
            _carry(current, obj, "status")  # through the main resource the status does not change
        metadata = obj["metadata"]
        for key in _SERVER_METADATA:
            _carry(current["metadata"], metadata, key)
        metadata.pop("managedFields", None)
        metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        obj["apiVersion"] = rtype.api_version(rtype.storage_version)
        warnings = admit(
            rtype,
            version,
            obj,
            current,
            field_validation=field_validation,
            neighbours=self._neighbours(rtype, current["metadata"]["uid"]),
        )
        if obj == current:
            return Written(self.present(rtype, version, current), warnings)  # a no-op writes nothing
        if rtype.tracks_generation and _spec(obj, has_status) != _spec(current, has_status):
            metadata["generation"] = current["metadata"].get("generation", 0) + 1
        if dry_run:
            return Written(self.present(rtype, version, obj), warnings)
        stored = self.store.write(rtype.group_resource, obj)
        if metadata.get("deletionTimestamp") and not metadata.get("finalizers"):
            self._finish_deletion(rtype, stored, "Background")  # the last finalizer went
        return Written(self.present(rtype, version, stored), warnings)

    def _neighbours(self, rtype: ResourceType, uid: str | None) -> Callable[[], list[dict]]:
        """The other objects of this type, for rules that keep something unique (cluster IPs)."""
        return lambda: [o for _, o in self.store.items(rtype.group_resource) if o["metadata"]["uid"] != uid]

    def _delete(self, rtype: ResourceType, current: dict, propagation: str) -> tuple[dict, bool]:
        metadata = current["metadata"]
        if metadata.get("deletionTimestamp"):
            return current, False
        if metadata.get("finalizers"):
            # Finalizers hold the object: it is only marked; removing the last one deletes it.
            terminating = copy.deepcopy(current)
            terminating["metadata"].update(deletionTimestamp=now(), deletionGracePeriodSeconds=0)
            if rtype.tracks_generation:
                terminating["metadata"]["generation"] = metadata.get("generation", 0) + 1
            return self.store.write(rtype.group_resource, terminating), False
        return self._finish_deletion(rtype, current, propagation), True

    def _finish_deletion(self, rtype: ResourceType, obj: dict, propagation: str) -> dict:
        if propagation == "Foreground":
            self._collect_dependents(obj, propagation)
        gone = self.store.remove(rtype.group_resource, obj)
        if propagation != "Foreground":
            self._collect_dependents(obj, propagation)
        return gone

    def _collect_dependents(self, owner: dict, propagation: str) -> None:
        """The garbage collector, run at once: dependents whose owners are all gone are deleted.

        Only dependents in the owner's namespace count (or anywhere, for a cluster-scoped owner):
        the real collector treats a cross-namespace owner reference as pointing at nothing.
        """
        uid = owner["metadata"]["uid"]
        namespace = owner["metadata"].get("namespace")
        for resource, candidate in self.store.items(None, namespace):
            dependent = self.store.get(*self.store.key(resource, candidate))
            if dependent is None:
                continue  # collected already, as a dependent of an earlier dependent
            references = dependent["metadata"].get("ownerReferences") or []
            if not any(reference.get("uid") == uid for reference in references):
                continue
            others = [r for r in references if r.get("uid") != uid]
            remaining = others if propagation == "Orphan" else [r for r in others if self._owner_exists(r, dependent)]
            rtype = self._types[resource]
            if remaining or propagation == "Orphan":
                updated = copy.deepcopy(dependent)
                updated["metadata"]["ownerReferences"] = remaining
                if not remaining:
                    del updated["metadata"]["ownerReferences"]
                self.store.write(resource, updated)
            else:
                self._delete(rtype, dependent, propagation)

    def _owner_exists(self, reference: dict, dependent: dict) -> bool:
        owner = self.store.by_uid(reference.get("uid", ""))
        if owner is None:
            return False
        owner_namespace = owner["metadata"].get("namespace", "")
        return not owner_namespace or owner_namespace == dependent["metadata"].get("namespace")


def _carry(source: dict, target: dict, key: str) -> None:
    """Make target[key] what source has, including absent."""
    if key in source:
        target[key] = copy.deepcopy(source[key])
    else:
        target.pop(key, None)


def _spec(obj: dict, status_is_separate: bool) -> dict:
    """What metadata.generation counts changes of: all but metadata (and status, when a subresource)."""
    ignored = {"metadata", "apiVersion", "kind"} | ({"status"} if status_is_separate else set())
    return {k: v for k, v in obj.items() if k not in ignored}


def _short(body: object) -> str:
    text = json.dumps(body, separators=(",", ":"))
    return text if len(text) <= 100 else text[:100] + "..."
