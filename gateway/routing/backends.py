"""Weighted backend choice: weight / sum(weights), per request, weight 0 never chosen."""

from __future__ import annotations

import random
from itertools import accumulate

from gateway.config.model import BackendChoice


class BackendPicker:
    __slots__ = ("_choices", "_cumulative")

    def __init__(self, choices: tuple[BackendChoice, ...]):
        live = [c for c in choices if c.weight > 0]
        self._choices = live
        self._cumulative = list(accumulate(c.weight for c in live))

    def pick(self) -> BackendChoice | None:
        """None when nothing can receive traffic (no backendRefs, or every weight 0)."""
        if len(self._choices) == 1:
            return self._choices[0]
        if not self._choices:
            return None
        return random.choices(self._choices, cum_weights=self._cumulative)[0]
