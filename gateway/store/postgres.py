"""The PostgreSQL store (asyncpg); the only module that imports asyncpg."""

from __future__ import annotations

from datetime import datetime
from typing import Callable, Sequence

import asyncpg

from gateway.audit.record import AuditRecord
from gateway.store import schema
from gateway.store.approvals_postgres import PostgresApprovals
from gateway.store.base import ApiKeyRecord, Store
from gateway.store.query import (
    API_KEY_COLUMNS, AUDIT_COLUMNS, api_key_from_row, audit_from_row, audit_rows, audit_where, dumps,
)

_TYPES = {"uuid": "uuid", "time": "timestamptz", "json": "jsonb", "float": "double precision", "bool": "boolean"}
# Held for the whole migration transaction, so replicas that start together migrate one at a
# time; the number only has to be the same in every replica (it spells "sandgate").
_MIGRATION_LOCK = 0x73616E6467617465
_MIGRATION_TIMEOUT = 60.0  # waiting for another replica's migration may take longer than a query
_COMMAND_TIMEOUT = 5.0

# Batches travel by COPY (text format): the gateway only joins strings and PostgreSQL parses the
# values (a parameterised INSERT of arrays made asyncpg encode every value: twice the gateway's
# CPU per record). COPY has no ON CONFLICT, so a batch holding an id stored before (a spool
# replayed after a write whose answer was lost) goes again through a temporary table created
# in its own transaction: the store keeps no state in a connection between transactions.
_CREATE_STAGE = "CREATE TEMPORARY TABLE sandgate_audit_stage (LIKE audit_events) ON COMMIT DROP"
_MOVE_STAGED = "INSERT INTO audit_events SELECT * FROM sandgate_audit_stage ON CONFLICT (id) DO NOTHING"
_COPY_NULL = "\\N"
_TABS_PER_LINE = len(AUDIT_COLUMNS) - 1
_COPY_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_SELECT_AUDIT = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_events"


def _same(at: datetime | None) -> datetime | None:
    return at  # asyncpg reads and writes timestamptz as aware datetimes already


def _copy_text(records: Sequence[AuditRecord]) -> bytes:
    """The records as lines of COPY's text format, in AUDIT_COLUMNS order."""
    lines = []
    for row in audit_rows(records):
        fields = [_COPY_NULL if v is None else v if type(v) is str else repr(v) for v in row]
        line = "\t".join(fields)
        # Only the separators and the NULL markers' backslashes: then no value needs escaping.
        if line.count("\t") != _TABS_PER_LINE or line.count("\\") != row.count(None) or "\n" in line or "\r" in line:
            line = "\t".join([f if v is None else f.translate(_COPY_ESCAPE) for f, v in zip(fields, row)])
        lines.append(line)
    lines.append("")
    return "\n".join(lines).encode()


async def _one(data: bytes):
    yield data


def _placeholder(n: int) -> str:
    return f"${n}"


class PostgresStore(PostgresApprovals, Store):
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    @classmethod
    async def connect(cls, url: str, *, password: Callable[[], str] | None = None) -> PostgresStore:
        """`password`: called for each new connection (a secret file re-read when it changes)."""
        pool = await asyncpg.create_pool(
            url, min_size=1, max_size=4, command_timeout=_COMMAND_TIMEOUT, timeout=_COMMAND_TIMEOUT,
            **({"password": password} if password is not None else {}),
        )
        return cls(pool)

    async def migrate(self) -> None:
        async with self._pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK, timeout=_MIGRATION_TIMEOUT)
            await con.execute(schema.SCHEMA_TABLE.format(**_TYPES))
            current = await con.fetchval("SELECT coalesce(max(version), 0) FROM sandgate_schema")
            for version, statements in schema.pending(current, _TYPES):
                for sql in statements:
                    await con.execute(sql, timeout=_MIGRATION_TIMEOUT)
                await con.execute("INSERT INTO sandgate_schema (version, applied_at) VALUES ($1, now())", version)

    async def write_audit(self, records: Sequence[AuditRecord]) -> int:
        if not records:
            return 0
        data = _copy_text(records)
        async with self._pool.acquire() as con:
            try:
                async with con.transaction():
                    status = await con.copy_to_table("audit_events", source=_one(data), columns=AUDIT_COLUMNS)
                return int(status.rsplit(" ", 1)[1])  # "COPY <rows>"
            except asyncpg.UniqueViolationError:
                pass
            async with con.transaction():
                await con.execute(_CREATE_STAGE)
                await con.copy_to_table("sandgate_audit_stage", source=_one(data), columns=AUDIT_COLUMNS)
                status = await con.execute(_MOVE_STAGED)
            return int(status.rsplit(" ", 1)[1])  # "INSERT 0 <rows>"

    async def delete_audit_before(self, cutoff: datetime, limit: int) -> int:
        status = await self._pool.execute(
            "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE at < $1 LIMIT $2)", cutoff, limit)
        return int(status.rsplit(" ", 1)[1])  # "DELETE <rows>"

    async def count_audit(self, **filters) -> int:
        where, args = audit_where(filters, _placeholder, _same)
        return await self._pool.fetchval(f"SELECT count(*) FROM audit_events{where}", *args)

    async def list_audit(self, limit: int = 100, **filters) -> list[AuditRecord]:
        where, args = audit_where(filters, _placeholder, _same)
        rows = await self._pool.fetch(f"{_SELECT_AUDIT}{where} ORDER BY at DESC, id DESC LIMIT {_placeholder(len(args) + 1)}", *args, limit)
        return [audit_from_row(r, _same) for r in rows]

    async def create_api_key(
        self, key_id: str, key_hash: str, owner: str, scopes: Sequence[str], expires_at: datetime | None,
    ) -> ApiKeyRecord:
        row = await self._pool.fetchrow(
            "INSERT INTO api_keys (id, key_hash, owner, scopes, created_at, expires_at)"
            f" VALUES ($1, $2, $3, $4::jsonb, now(), $5) RETURNING {API_KEY_COLUMNS}",
            key_id, key_hash, owner, dumps(list(scopes)), expires_at,
        )
        return api_key_from_row(row, _same)

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self._pool.fetchrow(
            f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now())",
            key_hash,
        )
        return api_key_from_row(row, _same) if row else None

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        rows = await self._pool.fetch(f"SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id")
        return [api_key_from_row(r, _same) for r in rows]

    async def revoke_api_key(self, key_id: str) -> bool:
        status = await self._pool.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id)
        return status == "UPDATE 1"

    async def ping(self) -> bool:
        try:
            return await self._pool.fetchval("SELECT 1", timeout=2.0) == 1
        except Exception:  # refused, reset, timed out, shutting down: all mean "not now"
            return False

    async def close(self) -> None:
        await self._pool.close()
