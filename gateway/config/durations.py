"""Gateway API durations (GEP-2257): "1h30m", "500ms", "0s"."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float:
    """Seconds in a Gateway API duration; ValueError if it is not one."""
    if not isinstance(text, str) or _DURATION.match(text) is None:
        raise ValueError(f"invalid duration {text!r} (expected e.g. 500ms, 10s, 1h30m)")
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(text))


def parse_lifetime(text: str) -> float:
    """Seconds in "30d" as well as in a Gateway API duration ("12h", "90m")."""
    if text.endswith("d") and text[:-1].isdigit() and len(text) <= 6:
        return int(text[:-1]) * 86400.0
    return parse_duration(text)


def parse_timeout(text: str | None) -> float | None:
    """A timeout setting: None when unset, and also for "0s", which disables the timeout."""
    if text is None:
        return None
    seconds = parse_duration(text)
    return seconds or None
