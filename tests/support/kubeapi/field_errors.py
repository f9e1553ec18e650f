"""Field errors as apimachinery's field.Error renders them: they become the causes of a 422 Invalid."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str
    message: str

    def cause(self) -> dict:
        return {"reason": self.reason, "message": self.message, "field": self.field}

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def go_value(value: Any) -> str:
    """A value the way the Go server prints it in messages (%#v): strings quoted, numbers bare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, separators=(",", ":"))


def _with(summary: str, detail: str) -> str:
    return f"{summary}: {detail}" if detail else summary


def required(field: str, detail: str = "") -> FieldError:
    return FieldError(field, "FieldValueRequired", _with("Required value", detail))


def invalid(field: str, value: Any, detail: str = "") -> FieldError:
    return FieldError(field, "FieldValueInvalid", _with(f"Invalid value: {go_value(value)}", detail))


def type_invalid(field: str, value: Any, detail: str) -> FieldError:
    return FieldError(field, "FieldValueTypeInvalid", _with(f"Invalid value: {go_value(value)}", detail))


def not_supported(field: str, value: Any, supported: list) -> FieldError:
    choices = ", ".join(go_value(choice) for choice in supported)
    return FieldError(
        field, "FieldValueNotSupported", f"Unsupported value: {go_value(value)}: supported values: {choices}"
    )


def duplicate(field: str, value: Any) -> FieldError:
    return FieldError(field, "FieldValueDuplicate", f"Duplicate value: {go_value(value)}")


def forbidden(field: str, detail: str) -> FieldError:
    return FieldError(field, "FieldValueForbidden", f"Forbidden: {detail}")


def too_long(field: str, max_bytes: int) -> FieldError:
    return FieldError(field, "FieldValueTooLong", f"Too long: may not be more than {max_bytes} bytes")


def too_many(field: str, actual: int, max_items: int) -> FieldError:
    return FieldError(field, "FieldValueTooMany", f"Too many: {actual}: must have at most {max_items} items")


def join(path: str, key: str) -> str:
    """A child field path: `spec` + `ports` -> `spec.ports`; the root has no leading dot."""
    return f"{path}.{key}" if path else key
