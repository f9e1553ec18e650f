"""ObjectMeta checks every write goes through: name, namespace, labels, annotations, owners, finalizers."""

from __future__ import annotations

import json

from . import field_errors as fe
from . import names
from .catalog import ResourceType
from .field_errors import FieldError

_ANNOTATIONS_MAX_BYTES = 256 * 1024


def validate(rtype: ResourceType, metadata: dict, old_metadata: dict | None) -> list[FieldError]:
    return [
        *_name(rtype, metadata),
        *_namespace(rtype, metadata),
        *_labels(metadata.get("labels") or {}),
        *_annotations(metadata.get("annotations") or {}),
        *_owner_references(metadata.get("ownerReferences") or []),
        *_finalizers(metadata.get("finalizers") or [], old_metadata),
    ]


def _name(rtype: ResourceType, metadata: dict) -> list[FieldError]:
    name = metadata.get("name")
    if not name:
        return [fe.required("metadata.name", "name or generateName is required")]
    # Services become DNS labels (<name>.<ns>.svc), hence the stricter DNS-1035 rule.
    rule = names.dns1035_label if rtype.kind == "Service" else names.dns1123_subdomain
    return [fe.invalid("metadata.name", name, message) for message in rule(name)]


def _namespace(rtype: ResourceType, metadata: dict) -> list[FieldError]:
    namespace = metadata.get("namespace", "")
    if not rtype.namespaced:
        return []
    if not namespace:
        return [fe.required("metadata.namespace")]
    return [fe.invalid("metadata.namespace", namespace, m) for m in names.dns1123_label(namespace)]


def _labels(labels: dict) -> list[FieldError]:
    errors = []
    for key, value in labels.items():
        errors += [fe.invalid("metadata.labels", key, message) for message in names.qualified_name(key)]
        errors += [fe.invalid("metadata.labels", value, message) for message in names.label_value(value)]
    return errors


def _annotations(annotations: dict) -> list[FieldError]:
    errors = []
    for key in annotations:
        errors += [fe.invalid("metadata.annotations", key, m) for m in names.qualified_name(key.lower())]
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > _ANNOTATIONS_MAX_BYTES:
        errors.append(fe.too_long("metadata.annotations", _ANNOTATIONS_MAX_BYTES))
    return errors


def _owner_references(references: list[dict]) -> list[FieldError]:
    errors = []
    for field, what in (("apiVersion", "version"), ("kind", "kind"), ("name", "name"), ("uid", "uid")):
        for reference in references:
            if not reference.get(field):
                path = f"metadata.ownerReferences.{field}"
                errors.append(fe.invalid(path, reference.get(field, ""), f"{what} must not be empty"))
    controllers = [r for r in references if r.get("controller")]
    if len(controllers) > 1:
        listed = ", ".join(f"{r.get('kind')}/{r.get('name')}" for r in controllers)
        detail = f'Only one reference can have Controller set to true. Found "true" in references for {listed}'
        errors.append(fe.invalid("metadata.ownerReferences", json.dumps(references), detail))
    return errors


def _finalizers(finalizers: list[str], old_metadata: dict | None) -> list[FieldError]:
    errors = []
    for finalizer in finalizers:
        errors += [fe.invalid("metadata.finalizers", finalizer, m) for m in names.qualified_name(finalizer)]
    if old_metadata and old_metadata.get("deletionTimestamp"):
        added = set(finalizers) - set(old_metadata.get("finalizers") or [])
        if added:
            detail = "no new finalizers can be added if the object is being deleted, found new finalizers"
            errors.append(fe.forbidden("metadata.finalizers", f"{detail} {json.dumps(sorted(added))}"))
    return errors
