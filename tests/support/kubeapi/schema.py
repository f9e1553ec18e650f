"""A CRD's structural schema applied as the API server does: prune, default, then validate.

Covers the OpenAPI subset CRDs use: type, nullable, properties, additionalProperties, items,
required, enum, pattern, min/max(Length|Items|Properties|imum), format (date-time, int32, int64,
byte, ipv4, ipv6), allOf/anyOf/oneOf/not, x-kubernetes-preserve-unknown-fields,
x-kubernetes-int-or-string and x-kubernetes-list-type set/map. CEL rules are not evaluated.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from . import field_errors as fe
from .field_errors import FieldError

# The object's own envelope: metadata is checked as an ObjectMeta, never pruned by the schema.
_ENVELOPE = ("apiVersion", "kind", "metadata")


def prune_and_default(obj: dict, schema: Mapping) -> list[str]:
    """Drop unknown fields, apply defaults, in place; returns the dropped fields' paths."""
    pruned: list[str] = []
    _prune_and_default(obj, schema, "", pruned)
    return pruned


def _is_object(schema: Mapping) -> bool:
    return schema.get("type") == "object" or "properties" in schema or "additionalProperties" in schema


def _prune_and_default(value: Any, schema: Mapping, path: str, pruned: list[str]) -> None:
    if isinstance(value, dict) and _is_object(schema):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields") or additional is True
        for key in list(value):
            if not path and key in _ENVELOPE:
                continue
            child = fe.join(path, key)
            subschema = properties.get(key, additional if isinstance(additional, Mapping) else None)
            if subschema is None:
                if not keeps_unknown:
                    del value[key]
                    pruned.append(child)
            elif value[key] is None and not subschema.get("nullable"):
                del value[key]  # nulls of non-nullable fields go, so that a default can apply
            else:
                _prune_and_default(value[key], subschema, child, pruned)
        for key, subschema in properties.items():
            if key not in value and "default" in subschema:
                value[key] = copy.deepcopy(subschema["default"])
                _prune_and_default(value[key], subschema, fe.join(path, key), pruned)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            _prune_and_default(item, schema["items"], f"{path}[{index}]", pruned)


def validate(obj: Any, schema: Mapping, path: str = "") -> list[FieldError]:
    """Every violation, with the field paths and messages a real API server reports."""
    if obj is None:
        if schema.get("nullable"):
            return []
        if "type" in schema:
            return [_type_error(path, obj, schema["type"])]
    errors = _type_and_value(obj, schema, path)
    if errors:
        return errors
    errors += _combinators(obj, schema, path)
    if isinstance(obj, dict):
        errors += _object(obj, schema, path)
    elif isinstance(obj, list):
        errors += _array(obj, schema, path)
    return errors


_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def json_type(value: Any) -> str:
    for name in ("boolean", "integer", "number", "string", "object", "array"):
        if _JSON_TYPES[name](value):
            return name
    return "null"


def _type_error(path: str, value: Any, expected: str) -> FieldError:
    actual = json_type(value)
    return fe.type_invalid(path, actual, f'{path} in body must be of type {expected}: "{actual}"')


def _type_and_value(value: Any, schema: Mapping, path: str) -> list[FieldError]:
    if schema.get("x-kubernetes-int-or-string"):
        if not (_JSON_TYPES["integer"](value) or isinstance(value, str)):
            return [_type_error(path, value, "integer-or-string")]
    elif "type" in schema and not _JSON_TYPES[schema["type"]](value):
        return [_type_error(path, value, schema["type"])]
    if "enum" in schema and value not in schema["enum"]:
        return [fe.not_supported(path, value, schema["enum"])]
    if isinstance(value, str):
        return _string(value, schema, path)
    if json_type(value) in ("integer", "number"):
        return _number(value, schema, path)
    return []


def _string(value: str, schema: Mapping, path: str) -> list[FieldError]:
    errors = []
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(fe.too_long(path, schema["maxLength"]))
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(fe.invalid(path, value, f"{path} in body should be at least {schema['minLength']} chars long"))
    if "pattern" in schema and not _regex(schema["pattern"]).search(value):
        errors.append(fe.invalid(path, value, f"{path} in body should match '{schema['pattern']}'"))
    form = schema.get("format")
    if form in _STRING_FORMATS and not _STRING_FORMATS[form](value):
        errors.append(fe.invalid(path, value, f'{path} in body must be of type {form}: "{value}"'))
    return errors


def _number(value: float, schema: Mapping, path: str) -> list[FieldError]:
    errors = []
    if "minimum" in schema:
        low, exclusive = schema["minimum"], schema.get("exclusiveMinimum", False)
        if value < low or (exclusive and value == low):
            relation = "greater than" if exclusive else "greater than or equal to"
            errors.append(fe.invalid(path, value, f"{path} in body should be {relation} {low}"))
    if "maximum" in schema:
        high, exclusive = schema["maximum"], schema.get("exclusiveMaximum", False)
        if value > high or (exclusive and value == high):
            relation = "less than" if exclusive else "less than or equal to"
            errors.append(fe.invalid(path, value, f"{path} in body should be {relation} {high}"))
    if "multipleOf" in schema and value % schema["multipleOf"]:
        errors.append(fe.invalid(path, value, f"{path} in body should be a multiple of {schema['multipleOf']}"))
    bits = {"int32": 31, "int64": 63}.get(schema.get("format", ""))
    if bits and isinstance(value, int) and not -(2**bits) <= value < 2**bits:
        errors.append(fe.invalid(path, value, f"{path} in body must be of type {schema['format']}"))
    return errors


def _object(obj: dict, schema: Mapping, path: str) -> list[FieldError]:
    errors = [fe.required(fe.join(path, key)) for key in schema.get("required", ()) if key not in obj]
    if "maxProperties" in schema and len(obj) > schema["maxProperties"]:
        errors.append(fe.too_many(path, len(obj), schema["maxProperties"]))
    if "minProperties" in schema and len(obj) < schema["minProperties"]:
        detail = f"{path} in body should have at least {schema['minProperties']} properties"
        errors.append(fe.invalid(path, len(obj), detail))
    properties = schema.get("properties", {})
    additional = schema.get("additionalProperties")
    for key, value in obj.items():
        subschema = properties.get(key, additional if isinstance(additional, Mapping) else None)
        if subschema is not None:
            errors += validate(value, subschema, fe.join(path, key))
    return errors


def _array(items: list, schema: Mapping, path: str) -> list[FieldError]:
    errors = []
    if "maxItems" in schema and len(items) > schema["maxItems"]:
        errors.append(fe.too_many(path, len(items), schema["maxItems"]))
    if "minItems" in schema and len(items) < schema["minItems"]:
        errors.append(fe.invalid(path, len(items), f"{path} in body should have at least {schema['minItems']} items"))
    errors += _duplicates(items, schema, path)
    if isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(items):
            errors += validate(item, schema["items"], f"{path}[{index}]")
    return errors


def _duplicates(items: list, schema: Mapping, path: str) -> list[FieldError]:
    """`x-kubernetes-list-type: set` entries, and `map` entries by their keys, must be unique."""
    list_type = schema.get("x-kubernetes-list-type")
    if list_type not in ("set", "map"):
        return []
    keys = schema.get("x-kubernetes-list-map-keys", [])

    def identity(item: Any) -> Any:
        if list_type == "map" and isinstance(item, dict):
            return {k: item[k] for k in keys if k in item}
        return item

    seen, errors = [], []
    for index, item in enumerate(items):
        key = identity(item)
        if key in seen:
            errors.append(fe.duplicate(f"{path}[{index}]", key))
        seen.append(key)
    return errors


def _combinators(value: Any, schema: Mapping, path: str) -> list[FieldError]:
    """allOf/anyOf/oneOf/not only check values here: in a structural schema they never prune."""
    errors = [e for sub in schema.get("allOf", ()) for e in validate(value, sub, path)]
    failed = []
    if "anyOf" in schema and all(validate(value, sub, path) for sub in schema["anyOf"]):
        failed.append("must validate at least one schema (anyOf)")
    if "oneOf" in schema and sum(not validate(value, sub, path) for sub in schema["oneOf"]) != 1:
        failed.append("must validate one and only one schema (oneOf)")
    if "not" in schema and not validate(value, schema["not"], path):
        failed.append("must not validate the schema (not)")
    return errors + [fe.invalid(path, json_type(value), f"{path} in body {why}") for why in failed]


@lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _is_date_time(value: str) -> bool:
    if not _RFC3339.match(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _is_base64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _is_ip(version: int):
    def check(value: str) -> bool:
        try:
            return ipaddress.ip_address(value).version == version
        except ValueError:
            return False

    return check


_STRING_FORMATS = {"date-time": _is_date_time, "byte": _is_base64, "ipv4": _is_ip(4), "ipv6": _is_ip(6)}
