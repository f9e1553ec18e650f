"""Preview approvals in the embedded store. One process owns the file, so a decision wakes its
waiters locally (Approvals does that); there is no cross-process notification."""

from __future__ import annotations

from datetime import datetime, timezone

from gateway.store.approval import (
    APPROVAL_COLUMNS, APPROVED, FAILED, LIST_LIMIT, OVER_REQUESTER_CAP, OVER_SANDBOX_CAP, PENDING, PRUNE_BATCH, ApprovalRecord,
)

_COLUMNS = ", ".join(APPROVAL_COLUMNS)
_TIMES = ("created_at", "expires_at", "decided_at")


def _encode(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _record(row) -> ApprovalRecord:
    values = dict(zip(APPROVAL_COLUMNS, row))
    for name in _TIMES:
        if values[name] is not None:
            values[name] = datetime.fromisoformat(values[name])
    return ApprovalRecord(**values)


class SqliteApprovals:
    """Mixed into SqliteStore: uses its `_run` (a worker thread) and `_conn`."""

    async def create_approval(self, record: ApprovalRecord, *, max_per_sandbox: int | None = None,
                              max_per_requester: int | None = None) -> str | None:
        """Insert `record` unless a cap on unexpired pending requests (of its sandbox, of its
        requester) is reached: None when inserted, else which cap. Count and insert are one
        write transaction, so nothing comes in between."""
        values = [getattr(record, c) for c in APPROVAL_COLUMNS]
        values = [_encode(v) if isinstance(v, datetime) else v for v in values]
        sql = f"INSERT INTO preview_approvals ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})"

        def create(conn) -> str | None:
            per_sandbox, per_requester = conn.execute(
                "SELECT coalesce(sum(namespace = ? AND sandbox = ?), 0), coalesce(sum(requested_by = ?), 0)"
                " FROM preview_approvals WHERE status = ? AND expires_at > ?",
                (record.namespace, record.sandbox, record.requested_by, PENDING, _encode(record.created_at))).fetchone()
            if max_per_sandbox is not None and per_sandbox >= max_per_sandbox:
                return OVER_SANDBOX_CAP
            if max_per_requester is not None and per_requester >= max_per_requester:
                return OVER_REQUESTER_CAP
            conn.execute(sql, values)
            return None

        # one transaction: other processes on the same file wait for it
        return await self._run(self._transaction, create)

    async def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        row = await self._run(lambda: self._conn.execute(
            f"SELECT {_COLUMNS} FROM preview_approvals WHERE id = ?", (approval_id,)).fetchone())
        return _record(row) if row else None

    async def list_approvals(self, status: str | None = None) -> list[ApprovalRecord]:
        where, args = (" WHERE status = ?", (status,)) if status else ("", ())
        if status == PENDING:  # lapsed requests stay pending until pruned: they must not crowd out live ones
            where, args = where + " AND expires_at > ?", args + (_encode(datetime.now(timezone.utc)),)
        rows = await self._run(lambda: self._conn.execute(
            f"SELECT {_COLUMNS} FROM preview_approvals{where} ORDER BY created_at DESC, id LIMIT {LIST_LIMIT}",
            args).fetchall())
        return [_record(r) for r in rows]

    async def decide_approval(self, approval_id: str, status: str, decided_by: str | None) -> bool:
        now = _encode(datetime.now(timezone.utc))
        cursor = await self._run(lambda: self._conn.execute(
            "UPDATE preview_approvals SET status = ?, decided_by = ?, decided_at = ? WHERE id = ? AND status = ?",
            (status, decided_by, now, approval_id, PENDING)))
        return cursor.rowcount == 1

    async def finish_approval(self, approval_id: str, *, preview_token: str | None = None, error: str | None = None) -> None:
        status = FAILED if error else APPROVED
        await self._run(lambda: self._conn.execute(
            "UPDATE preview_approvals SET status = ?, preview_token = ?, error = ? WHERE id = ?",
            (status, preview_token, error, approval_id)))

    async def prune_approvals(self, before: datetime) -> int:
        """Delete up to PRUNE_BATCH requests decided (or lapsed) before `before`."""
        cursor = await self._run(lambda: self._conn.execute(
            "DELETE FROM preview_approvals WHERE id IN (SELECT id FROM preview_approvals"
            f" WHERE coalesce(decided_at, expires_at) < ? LIMIT {PRUNE_BATCH})", (_encode(before),)))
        return cursor.rowcount

    async def listen_approvals(self, callback) -> bool:
        return False  # waiters re-read the file; the process's own decisions wake them at once

    async def unlisten_approvals(self) -> None:
        return None
