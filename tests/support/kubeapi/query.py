"""Query parameters read as the Go server reads them (strconv.ParseBool, ParseInt)."""

from __future__ import annotations

from collections.abc import Mapping

from .status import bad_request

_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


def flag(query: Mapping[str, str], name: str, default: bool = False) -> bool:
    """kubernetes-asyncio sends Python's str(True): "True" is as good as "true"."""
    value = query.get(name)
    if value is None or value == "":
        return default
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise bad_request(f'{name}: Invalid value: "{value}": strconv.ParseBool: parsing "{value}": invalid syntax')


def integer(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        why = f'strconv.ParseInt: parsing "{value}": invalid syntax'
        raise bad_request(f'{name}: Invalid value: "{value}": {why}') from None


def choice(query: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = query.get(name) or default
    if value not in allowed:
        raise bad_request(f'{name}: Unsupported value: "{value}": supported values: {", ".join(allowed)}')
    return value
