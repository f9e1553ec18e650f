"""Rollups (SPEC §6, `--audit-allowed rollup`, the default): a decision repeated within a window
is stored once when first seen, then as one rollup record with the exact count of its repeats.

Identical means the same credential fingerprint, route rule, method, decision and reasons (and
policy revision, so that a reload starts new rollups). The path is not part of the key: a
rollup keeps the first request's path. Each key has a Slot from its first decision until its
window closes; a repeat costs Slot.again(): an integer and a tuple. A slot is closed when its
window ends (AuditLog's writer looks every flush), on AuditLog.stop(), or early when the table
is over its bounds; closing emits its rollup record if it counted any repeat, so no count is
ever lost. The next decision for that key after the close is "first seen" again.

The table is keyed by client input (the method, the credential), so it is bounded by count and
by bytes; the oldest slots are closed first.
"""

from __future__ import annotations

from time import monotonic, time_ns
from typing import Callable

from gateway.audit.record import AuditRecord, new_id

WINDOW_SECONDS = 60.0
MAX_SLOTS = 10_000
MAX_BYTES = 8 * 1024 * 1024
_SLOT_OVERHEAD = 400  # the slot, its key tuple and dict entry, the first record's tuple


class Slot:
    """The repeats of one decision key in one window. `id` is the rollup record's id, known from
    the start: the access-log lines of the repeats carry it as their audit id."""

    __slots__ = ("id", "record", "key", "size", "closes_at", "open", "count", "first", "last")

    def __init__(self, record: AuditRecord, key: tuple, size: int, closes_at: float):
        self.id = new_id()
        self.record = record  # the first-seen decision, stored on its own
        self.key = key
        self.size = size
        self.closes_at = closes_at
        self.open = True
        self.count = 0
        self.first: tuple[str, int] | None = None  # (request id, at_us) of the first repeat
        self.last: tuple[str, int] | None = None

    def again(self, request_id: str) -> None:
        """One more repeat of the decision (the request path's whole cost in rollup mode)."""
        self.count += 1
        self.last = (request_id, time_ns() // 1000)
        if self.first is None:
            self.first = self.last


class Rollups:
    def __init__(self, emit: Callable[[AuditRecord], None], *, window: float = WINDOW_SECONDS,
                 max_slots: int = MAX_SLOTS, max_bytes: int = MAX_BYTES):
        self._emit = emit  # AuditLog.record
        self._window = window
        self._max_slots = max_slots
        self._max_bytes = max_bytes
        self._slots: dict[tuple, Slot] = {}  # in creation order: the oldest close first
        self._bytes = 0
        self.evicted_total = 0  # slots closed early for the bounds (their counts were emitted)

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def bytes(self) -> int:
        return self._bytes

    def decided(self, record: AuditRecord, rule_index: int | None = None) -> Slot:
        """Count one decision of route rule `rule_index`: the first of its key is emitted as it
        is and opens a slot; a repeat only counts in the slot (slot.count > 0 after it)."""
        # SPEC §6's key is per route rule: a policy on a whole route never merges its rules. The
        # principal too: a refusal made without a credential fingerprint (a sandbox router's)
        # still rolls up per caller, never across callers.
        key = (record.detail.get("credential"), record.route, record.method, record.decision, record.reasons,
               record.policy, record.revision, record.principal, rule_index)
        slot = self._slots.get(key)
        if slot is not None:
            slot.again(record.request_id)
            return slot
        self._emit(record)
        size = _SLOT_OVERHEAD + sum(len(v) for v in (*key[:4], *record.reasons, record.path, record.principal,
                                                      record.host, record.request_id) if type(v) is str)
        slot = self._slots[key] = Slot(record, key, size, monotonic() + self._window)
        self._bytes += size
        while len(self._slots) > self._max_slots or (self._bytes > self._max_bytes and len(self._slots) > 1):
            self.evicted_total += 1
            self._close(next(iter(self._slots.values())))
        return slot

    def close_due(self) -> None:
        """Close the slots whose window has ended (the oldest are first in the table)."""
        now = monotonic()
        due = []
        for slot in self._slots.values():
            if slot.closes_at > now:
                break
            due.append(slot)
        for slot in due:
            self._close(slot)

    def close_all(self) -> None:
        for slot in list(self._slots.values()):
            self._close(slot)

    def _close(self, slot: Slot) -> None:
        del self._slots[slot.key]
        self._bytes -= slot.size
        slot.open = False
        if slot.count:
            self._emit(slot.record.rollup(slot.id, slot.count, slot.first, slot.last))
