"""Built-in objects decoded against kubernetes-asyncio's models, as the server decodes into Go structs.

A field the model does not declare is dropped and reported (a Warning, or a 400 under
fieldValidation=Strict); a value of the wrong JSON type is a 400 "cannot unmarshal" error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio.client import models

from .field_errors import join
from .schema import json_type

_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\(str, (.+)\)$")
_SCALARS = {
    "str": ("string", lambda v: isinstance(v, str)),
    "datetime": ("Time", lambda v: isinstance(v, str)),
    "date": ("Time", lambda v: isinstance(v, str)),
    "int": ("int64", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("float64", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("bool", lambda v: isinstance(v, bool)),
    "object": ("interface {}", lambda v: True),  # IntOrString, Quantity, RawExtension: checked elsewhere
}


@dataclass
class TypeMismatch(Exception):
    """Go's json error: `cannot unmarshal string into Go struct field ServicePort.spec.ports.port of type int64`."""

    json_type: str
    struct: str
    field: str
    go_type: str

    def __str__(self) -> str:
        return (
            f"json: cannot unmarshal {self.json_type} into Go struct field "
            f"{self.struct}.{self.field} of type {self.go_type}"
        )


def decode(value: Any, type_name: str, path: str = "") -> list[str]:
    """Drop what `type_name` does not declare, in place; returns the dropped fields' paths."""
    unknown: list[str] = []
    _decode(value, type_name, path, "", unknown)
    return unknown


def _decode(value: Any, type_name: str, path: str, struct: str, unknown: list[str]) -> None:
    if m := _LIST.match(type_name):
        _expect(isinstance(value, list), value, struct, path, f"[]{_go_name(m[1])}")
        for index, item in enumerate(value):
            _decode(item, m[1], f"{path}[{index}]", struct, unknown)
    elif m := _DICT.match(type_name):
        _expect(isinstance(value, dict), value, struct, path, f"map[string]{_go_name(m[1])}")
        for key, item in value.items():
            _decode(item, m[1], f"{path}[{key}]", struct, unknown)
    elif type_name in _SCALARS:
        go_type, accepts = _SCALARS[type_name]
        _expect(accepts(value), value, struct, path, go_type)
    else:
        _decode_model(value, getattr(models, type_name), path, struct, unknown)


def _decode_model(value: Any, model: type, path: str, struct: str, unknown: list[str]) -> None:
    _expect(isinstance(value, dict), value, struct, path, _go_name(model.__name__))
    fields = {json_key: model.openapi_types[attr] for attr, json_key in model.attribute_map.items()}
    for key in list(value):
        child = join(path, key)
        if key not in fields:
            del value[key]
            unknown.append(child)
        elif value[key] is None:
            del value[key]  # Go decodes null as the zero value: the field is simply unset
        else:
            _decode(value[key], fields[key], child, _go_name(model.__name__), unknown)


def _expect(ok: bool, value: Any, struct: str, path: str, go_type: str) -> None:
    if not ok:
        field = re.sub(r"\[[^\]]*\]", "", path)  # Go names the field without list indices
        raise TypeMismatch(_go_json_type(value), struct or "Object", field, go_type)


def _go_json_type(value: Any) -> str:
    kind = json_type(value)
    return {"integer": "number", "boolean": "bool"}.get(kind, kind)


def _go_name(type_name: str) -> str:
    if type_name in _SCALARS:
        return _SCALARS[type_name][0]
    return re.sub(r"^V\d+((alpha|beta)\d+)?", "", type_name)
