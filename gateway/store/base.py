"""The one interface the gateway persists through; PostgreSQL and SQLite implement it."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from gateway.audit.record import AuditRecord


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key as the store returns it: never its hash, which only lookups take as input."""

    id: str
    owner: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class Store(abc.ABC):
    @abc.abstractmethod
    async def migrate(self) -> None:
        """Create or upgrade the schema; running it again, or from two replicas at once, is safe."""

    @abc.abstractmethod
    async def write_audit(self, records: Sequence[AuditRecord]) -> int:
        """Insert the records whose id is not stored yet; returns how many were inserted."""

    @abc.abstractmethod
    async def delete_audit_before(self, cutoff: datetime, limit: int) -> int:
        """Delete at most `limit` records older than `cutoff` (one short statement, so that
        retention never holds a long lock); returns how many were deleted."""

    @abc.abstractmethod
    async def count_audit(self, **filters) -> int:
        """Filters: see gateway.store.query.audit_where."""

    @abc.abstractmethod
    async def list_audit(self, limit: int = 100, **filters) -> list[AuditRecord]:
        """Newest first."""

    @abc.abstractmethod
    async def create_api_key(
        self, key_id: str, key_hash: str, owner: str, scopes: Sequence[str], expires_at: datetime | None,
    ) -> ApiKeyRecord: ...

    @abc.abstractmethod
    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash if it is neither revoked nor expired."""

    @abc.abstractmethod
    async def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every key, revoked and expired ones included, oldest first."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str) -> bool:
        """True when a key that was not yet revoked is revoked now."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the store answers right now; never raises."""

    @abc.abstractmethod
    async def close(self) -> None: ...
