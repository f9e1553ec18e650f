"""The embedded default store: one SQLite file in WAL mode, used when no database URL is set.

sqlite3 blocks, so every call runs in a worker thread. One connection serves the process and a
threading lock (held inside the worker thread, so a cancelled caller cannot release it early)
keeps its transactions apart. Timestamps are stored as fixed-width UTC ISO-8601 text, which
sorts and compares in time order.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import datetime, timezone
from typing import Callable, Sequence, TypeVar

from gateway.audit.record import AuditRecord
from gateway.store import schema
from gateway.store.approvals_sqlite import SqliteApprovals
from gateway.store.base import ApiKeyRecord, Store
from gateway.store.query import (
    API_KEY_COLUMNS, AUDIT_COLUMNS, api_key_from_row, audit_from_row, audit_rows, audit_where, dumps,
)

T = TypeVar("T")

_TYPES = {"uuid": "text", "time": "text", "json": "text", "float": "real", "bool": "integer"}
_BUSY_TIMEOUT = 5.0  # another worker process may hold the write lock for a moment

_WIDTH = len(AUDIT_COLUMNS)
_CHUNK = 64  # rows per INSERT: 960 parameters, well under SQLite's limit of 32,766
_SELECT_AUDIT = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_events"


def _insert_audit(rows: int) -> str:
    """One INSERT of `rows` rows (sqlite3 keeps the compiled statements of recent texts)."""
    row = f"({', '.join('?' * _WIDTH)})"
    return f"INSERT OR IGNORE INTO audit_events ({', '.join(AUDIT_COLUMNS)}) VALUES {', '.join([row] * rows)}"


_INSERT_AUDIT_CHUNK = _insert_audit(_CHUNK)
def _encode_at(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _decode_at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _now() -> str:
    return _encode_at(datetime.now(timezone.utc))


def _placeholder(n: int) -> str:
    return "?"


class SqliteStore(SqliteApprovals, Store):
    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        return cls(await asyncio.to_thread(cls._connect, path))

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE takes the
        # write lock up front, so two processes migrating or writing wait instead of failing).
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    async def _run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args) -> T:
        with self._lock:
            return fn(*args)

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self._conn)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return result

    async def migrate(self) -> None:
        def apply(conn: sqlite3.Connection) -> None:
            conn.execute(schema.SCHEMA_TABLE.format(**_TYPES))
            current = conn.execute("SELECT coalesce(max(version), 0) FROM sandgate_schema").fetchone()[0]
            for version, statements in schema.pending(current, _TYPES):
                for sql in statements:
                    conn.execute(sql)
                conn.execute("INSERT INTO sandgate_schema (version, applied_at) VALUES (?, ?)", (version, _now()))

        await self._run(self._transaction, apply)

    async def write_audit(self, records: Sequence[AuditRecord]) -> int:
        if not records:
            return 0
        # One flat list of parameters, and one INSERT per _CHUNK rows (and one for the rest):
        # sqlite3 releases the GIL for each statement step, and taking it back from a busy event
        # loop costs thread switches, which on a gateway pinned to one CPU cost the requests.
        values: list = []
        for row in audit_rows(records):
            values += row
        whole = len(records) // _CHUNK * _CHUNK * _WIDTH
        chunks = [values[i:i + _CHUNK * _WIDTH] for i in range(0, whole, _CHUNK * _WIDTH)]
        rest = values[whole:]

        def insert(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(_INSERT_AUDIT_CHUNK, chunks)
            if rest:
                conn.execute(_insert_audit(len(rest) // _WIDTH), rest)
            return conn.total_changes - before

        return await self._run(self._transaction, insert)

    async def delete_audit_before(self, cutoff: datetime, limit: int) -> int:
        sql = "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE at < ? LIMIT ?)"
        return await self._run(self._transaction, lambda conn: conn.execute(sql, (_encode_at(cutoff), limit)).rowcount)

    async def count_audit(self, **filters) -> int:
        where, args = audit_where(filters, _placeholder, _encode_at)
        return await self._run(lambda: self._conn.execute(f"SELECT count(*) FROM audit_events{where}", args).fetchone()[0])

    async def list_audit(self, limit: int = 100, **filters) -> list[AuditRecord]:
        where, args = audit_where(filters, _placeholder, _encode_at)
        sql = f"{_SELECT_AUDIT}{where} ORDER BY at DESC, id DESC LIMIT ?"
        rows = await self._run(lambda: self._conn.execute(sql, [*args, limit]).fetchall())
        return [audit_from_row(r, _decode_at) for r in rows]

    async def create_api_key(
        self, key_id: str, key_hash: str, owner: str, scopes: Sequence[str], expires_at: datetime | None,
    ) -> ApiKeyRecord:
        values = (key_id, key_hash, owner, dumps(list(scopes)), _now(), expires_at and _encode_at(expires_at))
        row = await self._run(lambda: self._conn.execute(
            "INSERT INTO api_keys (id, key_hash, owner, scopes, created_at, expires_at)"
            f" VALUES (?, ?, ?, ?, ?, ?) RETURNING {API_KEY_COLUMNS}",
            values,
        ).fetchone())
        return api_key_from_row(row, _decode_at)

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self._run(lambda: self._conn.execute(
            f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > ?)",
            (key_hash, _now()),
        ).fetchone())
        return api_key_from_row(row, _decode_at) if row else None

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        rows = await self._run(lambda: self._conn.execute(f"SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id").fetchall())
        return [api_key_from_row(r, _decode_at) for r in rows]

    async def revoke_api_key(self, key_id: str) -> bool:
        changed = await self._run(lambda: self._conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (_now(), key_id),
        ).rowcount)
        return changed == 1

    async def ping(self) -> bool:
        try:
            return await self._run(lambda: self._conn.execute("SELECT 1").fetchone()[0]) == 1
        except sqlite3.Error:
            return False

    async def close(self) -> None:
        await self._run(self._conn.close)
