"""Admission of a write, in the server's order: decode (drop unknown fields), default, validate."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from . import metadata_rules, pod_rules, schema, service_rules, typed
from .catalog import ResourceType
from .status import bad_request, invalid
from .typed import TypeMismatch

FIELD_VALIDATION_MODES = ("Ignore", "Warn", "Strict")
_BUILTIN_RULES = {"Service": service_rules, "Pod": pod_rules}


def initial_status(rtype: ResourceType) -> dict | None:
    """What a create stores as status: whatever the client sent is not kept."""
    rules = _BUILTIN_RULES.get(rtype.kind) if rtype.builtin else None
    return dict(rules.INITIAL_STATUS) if rules else None


def admit(
    rtype: ResourceType,
    version: str,
    obj: dict,
    old: dict | None,
    *,
    field_validation: str,
    neighbours: Callable[[], Iterable[dict]],
) -> list[str]:
    """Make `obj` what the server would store (in place) or raise its ApiError; returns warnings."""
    warnings = _unknown_fields(_decode(rtype, version, obj), field_validation)
    rules = _BUILTIN_RULES.get(rtype.kind) if rtype.builtin else None
    if rules:
        rules.default(obj, old, neighbours)
    errors = metadata_rules.validate(rtype, obj["metadata"], old["metadata"] if old else None)
    if rules:
        errors += rules.validate(obj, old, neighbours)
    else:
        errors += schema.validate(obj, rtype.schemas[version])
    if errors:
        raise invalid(rtype, obj["metadata"].get("name", ""), errors)
    return warnings


def _decode(rtype: ResourceType, version: str, obj: dict) -> list[str]:
    try:
        if rtype.builtin:
            return typed.decode(obj, f"V1{rtype.kind}")
        unknown = typed.decode(obj["metadata"], "V1ObjectMeta", "metadata")
        return unknown + schema.prune_and_default(obj, rtype.schemas[version])
    except TypeMismatch as mismatch:
        raise bad_request(
            f'{rtype.kind} in version "{version}" cannot be handled as a {rtype.kind}: {mismatch}'
        ) from None


def _unknown_fields(paths: list[str], field_validation: str) -> list[str]:
    messages = [f'unknown field "{path}"' for path in paths]
    if messages and field_validation == "Strict":
        raise bad_request("strict decoding error: " + ", ".join(messages))
    return messages if field_validation == "Warn" else []
