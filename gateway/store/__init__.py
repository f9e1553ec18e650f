"""Persistence: audit events and API keys, behind one small interface (base.Store).

PostgreSQL when a database URL is given (SANDGATE_DATABASE_URL), else an embedded SQLite file.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from gateway.secrets import open_secret
from gateway.store.base import ApiKeyRecord, Store

__all__ = ["ApiKeyRecord", "Store", "open_store", "SQLITE_FILE"]

SQLITE_FILE = "sandgate.db"


async def open_store(url: str | None, *, data_dir: str, password_file: str | None = None) -> Store:
    """`password_file`: the database password's secret file (SANDGATE_DATABASE_PASSWORD_FILE),
    read for every new connection, so a rotated password is used without a restart; it
    overrides a password in the URL."""
    if not url:  # unset or empty SANDGATE_DATABASE_URL: the embedded store
        from gateway.store.sqlite import SqliteStore

        os.makedirs(data_dir, exist_ok=True)
        return await SqliteStore.open(os.path.join(data_dir, SQLITE_FILE))
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        # Imported here so that a gateway on the embedded store does not need asyncpg.
        from gateway.store.postgres import PostgresStore

        password = open_secret(password_file, "database password").text if password_file else None
        return await PostgresStore.connect(url, password=password)
    # Only the scheme is named: the rest of the URL may hold a password.
    raise ValueError(f"unsupported database URL scheme {scheme!r} (use postgresql://)")
