"""Validate Kubernetes-style objects against the CRD schemas vendored in gateway/schemas/.

Aims to reject what an API server with strict field validation would reject, minus CEL rules
(x-kubernetes-validations) and string formats, which callers check in code where they matter.
The CRD files total megabytes of YAML, so a file is parsed only when one of its kinds is first
validated, and each (apiVersion, kind) gets one compiled validator.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml parses these files ~8x faster

JsonPath = tuple[str | int, ...]


@dataclass(frozen=True)
class SchemaError:
    json_path: JsonPath
    message: str


def validate(obj: dict) -> list[SchemaError]:
    if not isinstance(obj, dict):
        return [SchemaError((), "object is not a mapping")]
    errors = _check_type_meta(obj)
    if errors:
        return errors
    validator = _validator(obj["apiVersion"], obj["kind"])
    if validator is None:
        return [SchemaError(("kind",), f"unknown kind {obj['kind']} (apiVersion {obj['apiVersion']})")]
    errors = _check_metadata(obj.get("metadata"))
    for error in validator.iter_errors(obj):
        for found in _describe(error):
            if found not in errors:  # some CRDs repeat an enum under allOf
                errors.append(found)
    return errors


def known_kinds() -> set[tuple[str, str]]:
    return {
        (f"{group}/{version}", kind)
        for (group, kind), path in _crd_files().items()
        for version in _served_schemas(path)
    }


def format_path(json_path: JsonPath) -> str:
    """("spec", "rules", 0, "name") -> "spec.rules[0].name"; odd keys are quoted."""
    out = ""
    for step in json_path:
        if isinstance(step, int):
            out += f"[{step}]"
        elif isinstance(step, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", step):
            out += f".{step}" if out else step
        else:
            out += f"[{json.dumps(step, default=str)}]"
    return out or "(root)"


# --- finding and compiling schemas -------------------------------------------------------

@cache
def _crd_files() -> dict[tuple[str, str], Path]:
    """(group, kind) -> CRD file, read from each file's head only."""
    files = {}
    for path in sorted(SCHEMA_DIR.rglob("*.yaml")):
        group, kind = _crd_identity(path)
        if group and kind:
            files[(group, kind)] = path
    return files


def _crd_identity(path: Path) -> tuple[str | None, str | None]:
    text = path.read_text(encoding="utf-8")
    # controller-gen writes group and names before versions, which holds the big schemas;
    # if a hand-written file orders keys differently, fall back to parsing all of it.
    head, found, _ = text.partition("\n  versions:")
    try:
        crd = yaml.load(head if found else text, Loader=_Loader)
        spec = crd["spec"]
        return spec.get("group"), spec.get("names", {}).get("kind")
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None, None


@cache
def _served_schemas(path: Path) -> dict[str, dict]:
    """version -> openAPIV3Schema, for the served versions of one CRD file."""
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    return {
        v["name"]: v["schema"]["openAPIV3Schema"]
        for v in crd["spec"]["versions"]
        if v.get("served") and "openAPIV3Schema" in v.get("schema", {})
    }


@cache
def _validator(api_version: str, kind: str) -> jsonschema.Draft7Validator | None:
    group, _, version = api_version.rpartition("/")
    path = _crd_files().get((group, kind))
    if path is None:
        return None
    schema = _served_schemas(path).get(version)
    if schema is None:
        return None
    converted = _to_json_schema(schema)
    _CrdValidator.check_schema(converted)
    return _CrdValidator(converted)


def _to_json_schema(node: dict) -> dict:
    """OpenAPI v3 structural schema -> JSON Schema draft 7 that also rejects unknown fields."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_to_json_schema(sub) for sub in value]
        elif key in ("format", "description", "nullable", "default", "example", "externalDocs"):
            pass  # formats are not checked (see module doc); the rest do not constrain
        elif key.startswith("x-kubernetes-") and key not in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys"):
            pass
        else:
            out[key] = value

    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
        # The CRD spells int-or-string as anyOf [integer, string] too; one type error is enough.
        if all(set(sub) == {"type"} for sub in out.get("anyOf", [{}])):
            out.pop("anyOf", None)
    if node.get("nullable"):
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    # An API server prunes (or, with strict field validation, rejects) fields the schema does
    # not name, except where it says to keep them.
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _unique_list_entries(validator, list_type, instance, schema):
    """x-kubernetes-list-type set/map: the API server rejects duplicate entries."""
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    map_keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for i, item in enumerate(instance):
        if list_type == "set":
            key = json.dumps(item, sort_keys=True, default=str)
        elif isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), default=str) for k in map_keys)
        else:
            continue  # wrong item type is reported by "items"
        if key in seen:
            what = "entry" if list_type == "set" else "entry for " + ", ".join(
                f"{k}={_short(item.get(k))}" for k in map_keys)
            yield jsonschema.ValidationError(f"duplicate {what}", path=[i])
        seen.add(key)


# OpenAPI v3's schema object is close to draft 7; the gaps are closed by _to_json_schema.
_CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _unique_list_entries})


# --- turning jsonschema errors into short messages ----------------------------------------

_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


def _describe(error: jsonschema.ValidationError) -> Iterator[SchemaError]:
    path: JsonPath = tuple(error.absolute_path)
    where = format_path(path)
    kind, value, instance = error.validator, error.validator_value, error.instance
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        for name in instance:
            if name not in known:
                yield SchemaError(path + (name,), f"unknown field {format_path(path + (name,))}")
        return
    if kind == "required":
        for name in value:
            if isinstance(instance, dict) and name not in instance:
                yield SchemaError(path + (name,), f"missing required field {format_path(path + (name,))}")
        return
    if kind == "type":
        wanted = " or ".join(value) if isinstance(value, list) else value
        got = _JSON_TYPES.get(type(instance), type(instance).__name__)
        message = f"expected {wanted}, got {got}"
    elif kind == "enum":
        message = f"{_short(instance)} is not one of {', '.join(_short(v) for v in value)}"
    elif kind == "pattern":
        message = f"{_short(instance)} does not match {value}"
    elif kind == "minLength":
        message = "must not be empty" if value == 1 else f"must be at least {value} characters"
    elif kind == "maxLength":
        message = f"must be at most {value} characters"
    elif kind == "minItems":
        message = "must not be empty" if value == 1 else f"must have at least {value} items"
    elif kind == "maxItems":
        message = f"must have at most {value} items"
    elif kind in ("anyOf", "oneOf"):
        message = f"does not match {'any' if kind == 'anyOf' else 'exactly one'} of the allowed forms"
    else:  # minimum, maximum, list uniqueness, ...: jsonschema's text is already short
        message = error.message
    yield SchemaError(path, f"{where}: {message}")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# --- apiVersion, kind and metadata (CRD schemas leave metadata open) ---------------------

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def _check_type_meta(obj: dict) -> list[SchemaError]:
    errors = []
    for field in ("apiVersion", "kind"):
        if field not in obj:
            errors.append(SchemaError((field,), f"missing required field {field}"))
        elif not isinstance(obj[field], str) or not obj[field]:
            errors.append(SchemaError((field,), f"{field}: expected non-empty string"))
    return errors


def _check_metadata(meta: Any) -> list[SchemaError]:
    if meta is None:
        return [SchemaError(("metadata",), "missing required field metadata")]
    if not isinstance(meta, dict):
        return [SchemaError(("metadata",), "metadata: expected object")]
    errors = []
    name = meta.get("name")
    if name is None and not meta.get("generateName"):  # the server names generateName objects
        errors.append(SchemaError(("metadata", "name"), "missing required field metadata.name"))
    elif name is not None and not _is_dns_subdomain(name):
        errors.append(SchemaError(("metadata", "name"),
                                  f"metadata.name: {_short(name)} is not a DNS-1123 subdomain"
                                  " (lowercase letters, digits, '-' and '.', at most 253)"))
    namespace = meta.get("namespace")
    if namespace is not None and not (isinstance(namespace, str) and len(namespace) <= 63
                                      and _DNS_LABEL.fullmatch(namespace)):
        errors.append(SchemaError(("metadata", "namespace"),
                                  f"metadata.namespace: {_short(namespace)} is not a DNS-1123 label"
                                  " (lowercase letters, digits and '-', at most 63)"))
    for field in ("labels", "annotations"):
        errors += _check_string_map(meta.get(field), field)
    return errors


def _check_string_map(entries: Any, field: str) -> list[SchemaError]:
    if entries is None:
        return []
    base: JsonPath = ("metadata", field)
    if not isinstance(entries, dict):
        return [SchemaError(base, f"{format_path(base)}: expected object")]
    errors = []
    for key, value in entries.items():
        path = base + (key,)
        if not _is_qualified_name(key):
            errors.append(SchemaError(path, f"{format_path(path)}: invalid key (want [prefix/]name,"
                                            " name at most 63 of [A-Za-z0-9-_.])"))
        if not isinstance(value, str):
            errors.append(SchemaError(path, f"{format_path(path)}: expected string, got "
                                            f"{_JSON_TYPES.get(type(value), type(value).__name__)}"))
        elif field == "labels" and value and not (len(value) <= 63 and _QUALIFIED_NAME.fullmatch(value)):
            # Label values are selectors' operands, so the server restricts them (no '@', ':' ...).
            errors.append(SchemaError(path, f"{format_path(path)}: {_short(value)} is not a valid label"
                                            " value (at most 63 of [A-Za-z0-9-_.])"))
    return errors


def _is_dns_subdomain(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 253 and bool(_DNS_SUBDOMAIN.fullmatch(value))


def _is_qualified_name(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    prefix, slash, name = key.rpartition("/")
    if slash and not _is_dns_subdomain(prefix):
        return False
    return len(name) <= 63 and bool(_QUALIFIED_NAME.fullmatch(name))
