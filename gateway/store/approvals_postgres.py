"""Preview approvals in PostgreSQL. Every change is announced with NOTIFY on one channel (in
the same transaction, so a waiter never wakes before the row is there); every replica LISTENs
on a connection of its own and wakes its waiters at once."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from gateway.store.approval import (
    APPROVAL_COLUMNS, APPROVED, CHANNEL, FAILED, LIST_LIMIT, OVER_REQUESTER_CAP, OVER_SANDBOX_CAP, PENDING, PRUNE_BATCH,
    ApprovalRecord,
)

log = logging.getLogger("sandgate.store")

_COLUMNS = ", ".join(APPROVAL_COLUMNS)
_RECONNECT = 1.0
# One advisory lock serialises creates on every replica, so the pending caps hold across them
# (creates are rare: a person asking for a preview).
_CREATE_LOCK = 0x5A6D_0001


class PostgresApprovals:
    """Mixed into PostgresStore: uses its asyncpg `_pool`."""

    _listener: asyncio.Task | None = None

    async def create_approval(self, record: ApprovalRecord, *, max_per_sandbox: int | None = None,
                              max_per_requester: int | None = None) -> str | None:
        """Insert `record` unless a cap on unexpired pending requests (of its sandbox, of its
        requester) is reached: None when inserted, else which cap."""
        values = [getattr(record, c) for c in APPROVAL_COLUMNS]
        placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        async with self._pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", _CREATE_LOCK)
            per_sandbox, per_requester = await con.fetchrow(
                "SELECT count(*) FILTER (WHERE namespace = $2 AND sandbox = $3),"
                " count(*) FILTER (WHERE requested_by = $4)"
                " FROM preview_approvals WHERE status = $1 AND expires_at > $5",
                PENDING, record.namespace, record.sandbox, record.requested_by, record.created_at)
            if max_per_sandbox is not None and per_sandbox >= max_per_sandbox:
                return OVER_SANDBOX_CAP
            if max_per_requester is not None and per_requester >= max_per_requester:
                return OVER_REQUESTER_CAP
            await con.execute(f"INSERT INTO preview_approvals ({_COLUMNS}) VALUES ({placeholders})", *values)
        return None

    async def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM preview_approvals WHERE id = $1", approval_id)
        return ApprovalRecord(**dict(row)) if row else None

    async def list_approvals(self, status: str | None = None) -> list[ApprovalRecord]:
        where, args = (" WHERE status = $1", (status,)) if status else ("", ())
        if status == PENDING:  # lapsed requests stay pending until pruned: they must not crowd out live ones
            where += " AND expires_at > now()"
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM preview_approvals{where} ORDER BY created_at DESC, id LIMIT {LIST_LIMIT}", *args)
        return [ApprovalRecord(**dict(r)) for r in rows]

    async def decide_approval(self, approval_id: str, status: str, decided_by: str | None) -> bool:
        async with self._pool.acquire() as con, con.transaction():
            result = await con.execute(
                "UPDATE preview_approvals SET status = $1, decided_by = $2, decided_at = now()"
                " WHERE id = $3 AND status = $4", status, decided_by, approval_id, PENDING)
            if result != "UPDATE 1":
                return False
            await con.execute("SELECT pg_notify($1, $2)", CHANNEL, approval_id)
            return True

    async def finish_approval(self, approval_id: str, *, preview_token: str | None = None, error: str | None = None) -> None:
        async with self._pool.acquire() as con, con.transaction():
            await con.execute("UPDATE preview_approvals SET status = $1, preview_token = $2, error = $3 WHERE id = $4",
                              FAILED if error else APPROVED, preview_token, error, approval_id)
            await con.execute("SELECT pg_notify($1, $2)", CHANNEL, approval_id)

    async def prune_approvals(self, before: datetime) -> int:
        """Delete up to PRUNE_BATCH requests decided (or lapsed) before `before`."""
        result = await self._pool.execute(
            "DELETE FROM preview_approvals WHERE id IN (SELECT id FROM preview_approvals"
            f" WHERE coalesce(decided_at, expires_at) < $1 LIMIT {PRUNE_BATCH})", before)
        return int(result.split()[-1])

    async def listen_approvals(self, callback) -> bool:
        """Start listening (and keep listening across database restarts)."""
        ready = asyncio.Event()
        self._listener = asyncio.get_running_loop().create_task(self._listen(callback, ready))
        try:
            await asyncio.wait_for(ready.wait(), 5.0)
        except asyncio.TimeoutError:
            log.warning("approvals: not listening for notifications yet; waiters fall back to re-reading")
        return True

    async def _listen(self, callback, ready: asyncio.Event) -> None:
        def deliver(_connection, _pid, _channel, payload: str) -> None:
            callback(payload)

        while True:
            try:
                async with self._pool.acquire() as con:
                    lost = asyncio.Event()
                    con.add_termination_listener(lambda _c: lost.set())
                    await con.add_listener(CHANNEL, deliver)
                    ready.set()
                    try:
                        while not lost.is_set() and not con.is_closed():
                            try:
                                await asyncio.wait_for(lost.wait(), 5.0)
                            except asyncio.TimeoutError:
                                await con.execute("SELECT 1")  # notices a dead connection
                    finally:
                        if not con.is_closed():
                            await con.remove_listener(CHANNEL, deliver)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the database went away: listen again when it is back
                log.warning("approvals: notification listener lost (%s); reconnecting", e)
            await asyncio.sleep(_RECONNECT)

    async def unlisten_approvals(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
