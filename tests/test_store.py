"""The store contract, run against both stores: a real PostgreSQL database and a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from gateway.audit.record import AuditRecord
from gateway.store import SQLITE_FILE, open_store, schema
from tests.support.postgres import fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request):
    """None (the embedded store) or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
    else:
        async with fresh_database() as url:
            yield url


@pytest.fixture
async def store(store_url, tmp_path):
    opened = await open_store(store_url, data_dir=str(tmp_path))
    await opened.migrate()
    yield opened
    await opened.close()


async def schema_versions(url: str | None, data_dir) -> list[int]:
    if url is None:
        with sqlite3.connect(data_dir / SQLITE_FILE) as conn:
            return [v for (v,) in conn.execute("SELECT version FROM sandgate_schema ORDER BY version")]
    conn = await asyncpg.connect(url)
    try:
        return [r["version"] for r in await conn.fetch("SELECT version FROM sandgate_schema ORDER BY version")]
    finally:
        await conn.close()


def decision(**fields) -> AuditRecord:
    values = dict(kind="decision", route="infra/api/0", policy="infra/api-jwt", decision="allow")
    values.update(fields)
    return AuditRecord(**values)


async def test_migrate_again_is_a_no_op(store, store_url, tmp_path):
    await store.write_audit([decision()])
    await store.migrate()
    assert await schema_versions(store_url, tmp_path) == list(schema.VERSIONS)
    assert await store.count_audit() == 1


async def test_concurrent_migrations_both_succeed(store_url, tmp_path):
    stores = [await open_store(store_url, data_dir=str(tmp_path)) for _ in range(2)]
    try:
        await asyncio.gather(*(s.migrate() for s in stores))
        assert await schema_versions(store_url, tmp_path) == list(schema.VERSIONS)
        assert await stores[1].write_audit([decision()]) == 1
    finally:
        for s in stores:
            await s.close()


async def test_duplicate_ids_are_stored_once(store):
    a, b, c = decision(), decision(), decision()
    assert await store.write_audit([a, b]) == 2
    assert await store.write_audit([a, b, c]) == 1
    assert await store.write_audit([c, c]) == 0
    assert await store.write_audit([]) == 0
    assert await store.count_audit() == 3


async def test_a_large_batch_is_stored_once_and_whole(store):
    # more rows than one multi-row INSERT of the embedded store takes, and not a multiple of it
    batch = [decision(request_id=f"req-{n}") for n in range(150)]
    assert await store.write_audit(batch) == 150
    assert await store.write_audit([*batch[::-1], *(decision() for _ in range(10))]) == 10
    assert await store.count_audit() == 160
    stored = {r.id: r for r in await store.list_audit(limit=200)}
    assert [stored[r.id] for r in batch] == batch


async def test_a_record_reads_back_as_written(store):
    rec = AuditRecord(
        kind="decision", request_id="req-1", route="infra/mcp/0", policy="infra/mcp-jwt", revision="r7",
        principal="user-ä", method="POST", host="agents.example.com", path="/mcp", decision="deny",
        reasons=("token-expired", "insufficient-scope"), latency_ms=1.25,
        detail={"token": "3f2a9c0d1e4b5a6f", "scopes": ["read"], "nested": {"n": 1}},
    )
    await store.write_audit([rec])
    assert await store.list_audit() == [rec]


async def test_hostile_text_does_not_poison_a_batch(store):
    hostile = decision(path="/a\x00b", principal="x\udcffy", detail={"h\x00": ["\ud800", "\x00"]})
    assert await store.write_audit([hostile, decision()]) == 2
    (stored,) = await store.list_audit(path="/a\ufffdb")
    assert stored.id == hostile.id and stored.principal == "x?y"
    assert stored.detail == {"h\ufffd": ["?", "\ufffd"]}


async def test_separators_and_backslashes_read_back_as_written(store):
    # PostgreSQL takes batches as COPY text, where tab, newline, CR and backslash are syntax and
    # \N means NULL: request data holding them must come back unchanged, next to real NULLs.
    tricky = decision(
        path="/a\tb\nc\rd\\e", principal="\\N", host="h\\", request_id=None, revision="\t",
        reasons=("a\tb", "\\N"), latency_ms=None, detail={"k\\": "v\n\"q\"", "t": "\t"},
    )
    plain = decision(principal=None, latency_ms=0.25)
    assert await store.write_audit([tricky, plain]) == 2
    stored = {r.id: r for r in await store.list_audit()}
    assert stored[tricky.id] == tricky and stored[plain.id] == plain
    assert stored[tricky.id].principal == "\\N" and stored[tricky.id].request_id is None


async def test_filters_and_order(store):
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    records = [
        decision(at=t0, decision="deny", principal="alice"),
        decision(at=t0 + timedelta(seconds=1), principal=None),
        AuditRecord(at=t0 + timedelta(seconds=2), kind="preview.created", principal="alice"),
    ]
    await store.write_audit(records)
    assert await store.count_audit(kind="decision") == 2
    assert await store.count_audit(decision="deny", principal="alice") == 1
    assert await store.count_audit(principal=None) == 1
    assert await store.count_audit(since=t0 + timedelta(seconds=1)) == 2
    assert await store.count_audit(until=t0 + timedelta(seconds=1)) == 1
    assert await store.list_audit() == records[::-1]  # newest first
    assert await store.list_audit(limit=1, kind="decision") == [records[1]]
    with pytest.raises(TypeError, match="detail"):
        await store.count_audit(detail="x")


async def test_api_keys_create_find_list_revoke(store):
    created = await store.create_api_key("k1", "hash-1", "alice", ["read", "write"], None)
    assert (created.id, created.owner, created.scopes, created.revoked_at) == ("k1", "alice", ("read", "write"), None)
    assert created.created_at.tzinfo is not None
    assert await store.find_api_key("hash-1") == created
    assert await store.find_api_key("hash-unknown") is None
    await store.create_api_key("k2", "hash-2", "bob", [], None)
    listed = await store.list_api_keys()
    assert [k.id for k in listed] == ["k1", "k2"]
    assert all(not hasattr(k, "key_hash") for k in listed)

    assert await store.revoke_api_key("k1") is True
    assert await store.revoke_api_key("k1") is False
    assert await store.revoke_api_key("nope") is False
    assert await store.find_api_key("hash-1") is None
    revoked = {k.id: k for k in await store.list_api_keys()}["k1"]
    assert revoked.revoked_at is not None


async def test_api_key_expiry(store):
    now = datetime.now(timezone.utc)
    await store.create_api_key("old", "hash-old", "alice", ["read"], now - timedelta(seconds=1))
    fresh = await store.create_api_key("new", "hash-new", "alice", ["read"], now + timedelta(days=30))
    assert await store.find_api_key("hash-old") is None
    assert await store.find_api_key("hash-new") == fresh
    assert fresh.expires_at == now + timedelta(days=30)


async def test_ping(store):
    assert await store.ping() is True


async def test_embedded_store_is_one_wal_file_in_the_data_dir(tmp_path):
    data_dir = tmp_path / "state"  # created on demand
    store = await open_store(None, data_dir=str(data_dir))
    try:
        await store.migrate()
    finally:
        await store.close()
    with sqlite3.connect(data_dir / SQLITE_FILE) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_unknown_url_scheme_names_only_the_scheme(tmp_path):
    with pytest.raises(ValueError) as err:
        await open_store("mysql://root:s3cret@db/x", data_dir=str(tmp_path))
    assert "mysql" in str(err.value) and "s3cret" not in str(err.value)
