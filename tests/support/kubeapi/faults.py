"""Fault injection: the next matching request(s) get a Status instead of being served."""

from __future__ import annotations

from dataclasses import dataclass

from .status import failure


@dataclass
class Fault:
    method: str
    plural: str
    status: int
    reason: str
    message: str
    remaining: int


class Faults:
    def __init__(self) -> None:
        self._planned: list[Fault] = []

    def add(self, method: str, plural: str, status: int, times: int, reason: str, message: str | None) -> None:
        message = message or f"injected by the test double: {reason}"
        self._planned.append(Fault(method.upper(), plural, status, reason, message, times))

    def take(self, method: str, plural: str) -> dict | None:
        """The Status to answer instead, using up one of the first matching fault's times."""
        for fault in self._planned:
            if fault.method == method and fault.plural == plural:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._planned.remove(fault)
                return failure(fault.status, fault.reason, fault.message, {"kind": plural})
        return None
