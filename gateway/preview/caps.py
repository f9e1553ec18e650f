"""The preview caps of a SandboxPolicy (SPEC §5): per sandbox, per owner and in total.

A create takes its place under every cap before its first Kubernetes API call and keeps it until
the preview is in the table (or the create failed), so N parallel creates on one replica never
exceed a cap: checking and reserving happen in one step of the event loop, with no await in
between. Across replicas each one counts the previews its watch has delivered plus its own
creates under way: two replicas creating at the same instant can together pass a cap by the
creates the other one had not yet published (the watch closes that window within about a
second); the reaper does not delete previews over a cap.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from gateway.policy.model import SandboxPolicy
from gateway.preview.table import PreviewTable
from gateway.refusal import Refusal


class PreviewCaps:
    def __init__(self) -> None:
        # ("sandbox", namespace, name) / ("owner", owner) / ("total",) -> creates under way.
        # An entry lives only while its creates do: at most as many as creates in flight.
        self._reserved: Counter[tuple] = Counter()

    def check(self, table: PreviewTable, namespace: str, sandbox: str, owner: str, policy: SandboxPolicy) -> None:
        """Refusal(429) when a new preview would pass a cap, counting creates under way."""
        limits = [
            (policy.preview_max_per_sandbox, table.count(namespace, sandbox), f"Sandbox {sandbox} already has {{}} previews."),
            (policy.preview_max_per_owner, table.count_owned(owner), "You already have {} open previews."),
            (policy.preview_max_total, table.count(), "The limit of {} open previews is reached."),
        ]
        for (limit, open_now, message), key in zip(limits, _keys(namespace, sandbox, owner)):
            if limit is not None and open_now + self._reserved[key] >= limit:
                raise Refusal(429, "preview_limit", message.format(limit))

    @contextmanager
    def reserve(self, table: PreviewTable, namespace: str, sandbox: str, owner: str,
                policy: SandboxPolicy) -> Iterator[None]:
        self.check(table, namespace, sandbox, owner, policy)
        keys = _keys(namespace, sandbox, owner)
        self._reserved.update(keys)  # no await since the check: nothing came in between
        try:
            yield
        finally:
            self._reserved.subtract(keys)
            for key in keys:
                if self._reserved[key] <= 0:
                    del self._reserved[key]


def _keys(namespace: str, sandbox: str, owner: str) -> list[tuple]:
    return [("sandbox", namespace, sandbox), ("owner", owner), ("total",)]
