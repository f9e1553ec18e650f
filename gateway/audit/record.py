"""One audit event: a policy decision, or a preview / terminal lifecycle event (SPEC §6).

A record carries fingerprints of credentials, never a token or an API key: records are spooled
to local disk and kept for a long time, so a raw secret here would leak in two places.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Mapping


def _new_id() -> str:
    # 128 random bits in a uuid's shape; an id needs uniqueness, not secrecy, and a system
    # call per record is measurable at thousands of decisions per second.
    return f"{random.getrandbits(128):032x}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    id: str = field(default_factory=_new_id)
    at: datetime = field(default_factory=_now)
    kind: str  # "decision", "preview.created", "terminal.opened", ...
    request_id: str | None = None
    route: str | None = None
    policy: str | None = None
    revision: str | None = None
    principal: str | None = None
    method: str | None = None
    host: str | None = None
    path: str | None = None
    decision: str | None = None  # "allow" / "deny"
    reasons: tuple[str, ...] = ()
    latency_ms: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The id is the store's primary key (a uuid column in PostgreSQL): a malformed id must
        # fail here, where it is made, not later as a batch the store refuses over and over.
        if _HEX_ID.fullmatch(self.id) is None:
            object.__setattr__(self, "id", uuid.UUID(self.id).hex)
        # Stored timestamps are UTC; a naive one is taken as UTC rather than local time.
        if self.at.tzinfo is not timezone.utc:
            at = self.at if self.at.tzinfo else self.at.replace(tzinfo=timezone.utc)
            object.__setattr__(self, "at", at.astimezone(timezone.utc))
        if type(self.reasons) is not tuple:
            object.__setattr__(self, "reasons", tuple(self.reasons))

    def as_dict(self) -> dict:
        """Plain JSON-ready values (the spool's line, the access log's decision fields)."""
        out = {name: getattr(self, name) for name in _NAMES}
        out["at"] = self.at.isoformat()
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
        # A spool written by another version may carry fields this one lacks: keep the record.
        return cls(**{k: v for k, v in data.items() if k in _FIELDS})


_NAMES = tuple(f.name for f in fields(AuditRecord))
_FIELDS = frozenset(_NAMES)
_HEX_ID = re.compile(r"[0-9a-f]{32}")
