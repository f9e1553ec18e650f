"""One audit event: a policy decision, or a preview / terminal lifecycle event (SPEC §6).

A record carries fingerprints of credentials, never a token or an API key: records are spooled
to local disk and kept for a long time, so a raw secret here would leak in two places.

A record is made on the request path for every decision, so it is an immutable tuple whose
fields are the store's columns in order (gateway.store.query.AUDIT_COLUMNS): making one costs
a tuple, not a frozen dataclass's attribute-by-attribute initialisation. Its time is kept as
integer microseconds since the epoch (`at_us`, exact: what the stores keep) and read as an
aware UTC datetime (`at`); the stores format it in the writer, off the request path.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import namedtuple
from datetime import datetime, timedelta, timezone
from random import getrandbits
from time import time_ns
from typing import Any, Mapping

_UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_MICROSECOND = timedelta(microseconds=1)

AUDIT_FIELDS = (
    "id", "at_us", "kind", "request_id", "route", "policy", "revision", "principal",
    "method", "host", "path", "decision", "reasons", "latency_ms", "detail",
    "request_count", "last_request_id", "last_at_us", "path_cut",
)

# SPEC §6: recorded paths are cut at 2 KiB (of UTF-8) and marked as cut (`path_cut`): a path is
# client input, and a record is queued, spooled and kept for the whole retention.
PATH_MAX_BYTES = 2048


def new_id(unix_ms: int | None = None) -> str:
    """A UUIDv7 (RFC 9562) as 32 hex digits: 48 bits of Unix milliseconds (default: now), then
    74 random bits.

    Ids need uniqueness, not secrecy; being time-ordered, consecutive records land next to each
    other in the stores' primary-key index instead of at a random page of it."""
    if unix_ms is None:
        unix_ms = time_ns() // 1_000_000
    value = (unix_ms & _MS_BITS) << 80 | getrandbits(80)
    return f"{value & _RANDOM_BITS | _VERSION_AND_VARIANT:032x}"


_MS_BITS = (1 << 48) - 1
_RANDOM_BITS = ~(0xF << 76 | 0x3 << 62)  # where the version and the variant go
_VERSION_AND_VARIANT = 0x7 << 76 | 0x2 << 62


class AuditRecord(namedtuple("_AuditFields", AUDIT_FIELDS)):
    """Fields (all keyword-only; `kind` required):

    id          32 hex digits, the stores' primary key (default: a new time-ordered id)
    at          a datetime, naive taken as UTC (default: now); read back as aware UTC
    kind        "decision", "preview.created", "terminal.opened", ...
    request_id, route, policy, revision, principal, method, host, path: text or None
    decision    "allow" / "deny" (decisions only)
    reasons     tuple of reason codes
    latency_ms  float or None
    detail      JSON-ready mapping (fingerprints, never secrets)
    request_count    how many requests this record stands for: 1, or a rollup's exact count
    last_request_id, last_at    a rollup's last request (request_id and at are its first); else None
    path_cut    True when `path` was longer than PATH_MAX_BYTES and is cut to it
    """

    __slots__ = ()

    def __new__(
        cls,
        *,
        kind: str,
        id: str | None = None,
        at: datetime | None = None,
        request_id: str | None = None,
        route: str | None = None,
        policy: str | None = None,
        revision: str | None = None,
        principal: str | None = None,
        method: str | None = None,
        host: str | None = None,
        path: str | None = None,
        decision: str | None = None,
        reasons: tuple[str, ...] = (),
        latency_ms: float | None = None,
        detail: Mapping[str, Any] | None = None,
        request_count: int = 1,
        last_request_id: str | None = None,
        last_at: datetime | None = None,
        path_cut: bool = False,
    ) -> AuditRecord:
        if at is None:
            at_us = time_ns() // 1000
        else:
            at_us = _us(at)
        if id is None:
            id = new_id(at_us // 1000)
        elif _HEX_ID.fullmatch(id) is None:
            # The id is the store's primary key (a uuid column in PostgreSQL): a malformed id
            # must fail here, where it is made, not later as a batch the store refuses over and over.
            id = uuid.UUID(id).hex
        if type(reasons) is not tuple:
            reasons = tuple(reasons)
        if path is not None and len(path) > PATH_MAX_BYTES // 4:  # shorter ones fit whatever they hold
            path, cut = cut_path(path)
            path_cut = path_cut or cut
        return tuple.__new__(cls, (
            id, at_us, kind, request_id, route, policy, revision, principal,
            method, host, path, decision, reasons, latency_ms, {} if detail is None else detail,
            request_count, last_request_id, None if last_at is None else _us(last_at), bool(path_cut),
        ))

    def again(self, request_id: str, host: str, latency_ms: float) -> AuditRecord:
        """This decision once more, for another request: a new id and time, that request's id,
        host and latency, every other field shared (repeating a cached decision costs a tuple)."""
        at_us = time_ns() // 1000
        s = self
        return tuple.__new__(AuditRecord, (
            new_id(at_us // 1000), at_us, s[2], request_id, s[4], s[5], s[6], s[7], s[8], host, s[10], s[11], s[12],
            latency_ms, s[14], 1, None, None, s[18],
        ))

    def rollup(self, id: str, count: int, first: tuple[str, int], last: tuple[str, int]) -> AuditRecord:
        """The rollup record of `count` repeats of this decision: `first` and `last` are their
        (request id, at_us); host and latency are per request, in the access log only."""
        s = self
        return tuple.__new__(AuditRecord, (
            id, first[1], s[2], first[0], s[4], s[5], s[6], s[7], s[8], None, s[10], s[11], s[12],
            None, s[14], count, last[0], last[1], s[18],
        ))

    @property
    def at(self) -> datetime:
        return EPOCH + timedelta(microseconds=self.at_us)

    @property
    def last_at(self) -> datetime | None:
        return None if self.last_at_us is None else EPOCH + timedelta(microseconds=self.last_at_us)

    def __reduce__(self):
        # pickle and copy: __new__ takes keywords only
        return _rebuild, (tuple(self),)

    def as_dict(self) -> dict:
        """Plain JSON-ready values (the spool's line, the access log's decision fields)."""
        out = dict(zip(_NAMES, self))
        out["at"] = self.at.isoformat()
        out["last_at"] = None if self.last_at_us is None else self.last_at.isoformat()
        out["reasons"] = list(self.reasons)
        out["detail"] = dict(self.detail)
        return out

    def to_json(self) -> str:
        """One line of JSON (no newline inside), as the spool stores it."""
        # default=str: a stray non-JSON value in `detail` must not make the record unspoolable.
        return json.dumps(self.as_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, line: str) -> AuditRecord:
        data = json.loads(line)
        data["at"] = datetime.fromisoformat(data["at"])
        if data.get("last_at") is not None:
            data["last_at"] = datetime.fromisoformat(data["last_at"])
        # A spool written by another version may carry fields this one lacks: keep the record.
        return cls(**{k: v for k, v in data.items() if k in _FIELDS})


def _rebuild(values: tuple) -> AuditRecord:
    return tuple.__new__(AuditRecord, values)


def _us(at: datetime) -> int:
    # Stored timestamps are UTC; a naive one is taken as UTC rather than local time.
    return ((at if at.tzinfo else at.replace(tzinfo=_UTC)) - EPOCH) // _MICROSECOND


def cut_path(path: str) -> tuple[str, bool]:
    """(path, False) when it fits in PATH_MAX_BYTES of UTF-8, else its longest prefix that does
    (a character is never split), True."""
    data = path.encode("utf-8", "surrogatepass")
    if len(data) <= PATH_MAX_BYTES:
        return path, False
    return data[:PATH_MAX_BYTES].decode("utf-8", "ignore"), True


_NAMES = ("id", "at", *AUDIT_FIELDS[2:17], "last_at", "path_cut")  # the keyword arguments, in field order
_FIELDS = frozenset(_NAMES)
_HEX_ID = re.compile(r"[0-9a-f]{32}")
