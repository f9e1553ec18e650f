"""The schema, written once for both stores; each store only names its column types."""

from __future__ import annotations

from typing import Iterator, Mapping

SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS sandgate_schema (version integer PRIMARY KEY, applied_at {time} NOT NULL)"

# Append new versions; never edit one that has shipped.
_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE audit_events (
            id {uuid} PRIMARY KEY,
            at {time} NOT NULL,
            kind text NOT NULL,
            request_id text, route text, policy text, revision text, principal text,
            method text, host text, path text, decision text,
            reasons {json} NOT NULL DEFAULT '[]',
            latency_ms {float},
            detail {json} NOT NULL DEFAULT '{{}}')""",
        "CREATE INDEX audit_events_at ON audit_events (at)",
        """CREATE TABLE api_keys (
            id text PRIMARY KEY,
            key_hash text NOT NULL UNIQUE,
            owner text NOT NULL,
            scopes {json} NOT NULL DEFAULT '[]',
            created_at {time} NOT NULL,
            expires_at {time},
            revoked_at {time})""",
    )),
    (2, (
        """CREATE TABLE preview_approvals (
            id text PRIMARY KEY,
            zone text NOT NULL,
            namespace text NOT NULL,
            sandbox text NOT NULL,
            port integer NOT NULL,
            requested_by text NOT NULL,
            status text NOT NULL,
            created_at {time} NOT NULL,
            expires_at {time} NOT NULL,
            decided_by text,
            decided_at {time},
            preview_token text,
            error text)""",
        "CREATE INDEX preview_approvals_status ON preview_approvals (status, created_at)",
    )),
    (3, (
        # Rollups (SPEC §6): one record for many identical decisions, their exact count and the
        # last of them (request_id and at are the first); and paths cut at 2 KiB, marked.
        "ALTER TABLE audit_events ADD COLUMN request_count integer NOT NULL DEFAULT 1",
        "ALTER TABLE audit_events ADD COLUMN last_request_id text",
        "ALTER TABLE audit_events ADD COLUMN last_at {time}",
        "ALTER TABLE audit_events ADD COLUMN path_cut {bool} NOT NULL DEFAULT false",
    )),
)


def pending(current: int, types: Mapping[str, str]) -> Iterator[tuple[int, list[str]]]:
    """The migrations after version `current`, in order, as statements for these column types."""
    for version, statements in _MIGRATIONS:
        if version > current:
            yield version, [sql.format(**types) for sql in statements]


VERSIONS = tuple(version for version, _ in _MIGRATIONS)
