"""The store contract, run against both stores: a real PostgreSQL database and a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from gateway.audit import AuditLog
from gateway.audit.record import AuditRecord
from gateway.audit.spool import Spool
from gateway.store import SQLITE_FILE, open_store, schema
from gateway.store.postgres import _TYPES as postgres_types
from gateway.store.sqlite import _TYPES as sqlite_types
from tests.support.harness import free_port
from tests.support.postgres import fresh_database
from tests.support.store_gateway import sandgate_cli


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


# --- audit volume (SPEC §6): rollup records, paths cut at 2 KiB, retention, the v3 upgrade ----

async def test_a_rollup_record_reads_back_with_its_count_and_last_request(store):
    first = decision(request_id="req-2", path="/p")
    rollup = first.rollup("0" * 31 + "7", 41, ("req-2", first.at_us), ("req-42", first.at_us + 2_500_000))
    await store.write_audit([rollup])
    (stored,) = await store.list_audit(last_request_id="req-42")
    assert stored == rollup
    assert (stored.request_count, stored.request_id, stored.last_at - stored.at) == (41, "req-2", timedelta(seconds=2.5))


async def test_a_long_path_is_cut_at_2_kib_of_utf8_and_marked(store, tmp_path):
    multibyte = decision(path="/" + "é" * 5000)  # 2 bytes each: a cut never splits one
    ascii_ = decision(path="/" + "a" * 10_239)
    fits = decision(path="/" + "é" * 1023)  # 2047 bytes
    assert len(multibyte.path.encode()) == 2047 and multibyte.path_cut
    assert ascii_.path == "/" + "a" * 2047 and ascii_.path_cut
    assert len(fits.path) == 1024 and not fits.path_cut
    await store.write_audit([multibyte, ascii_, fits])
    stored = {r.id: r for r in await store.list_audit()}
    assert [stored[r.id] for r in (multibyte, ascii_, fits)] == [multibyte, ascii_, fits]
    spool = Spool(str(tmp_path / "spool"))  # the mark survives the spool too
    spool.append([multibyte])
    assert spool.set_aside() and next(spool.read_aside(10)) == [multibyte]


async def test_records_older_than_the_retention_are_deleted_in_batches(store, tmp_path):
    now = datetime.now(timezone.utc)
    old = [decision(at=now - timedelta(days=31, seconds=n)) for n in range(2345)]
    recent = [decision(at=now - timedelta(days=29)), decision()]
    await store.write_audit(old + recent)
    assert await store.delete_audit_before(now - timedelta(days=30), 1000) == 1000
    audit = AuditLog(store, str(tmp_path / "spool"), retention=timedelta(days=30), retention_interval=0.1)
    audit.start()  # its periodic task deletes the rest, RETENTION_BATCH rows per statement
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while await store.count_audit() != 2:
            assert asyncio.get_running_loop().time() < deadline, await store.count_audit()
            await asyncio.sleep(0.05)
    finally:
        await audit.stop()
    assert {r.id for r in await store.list_audit()} == {r.id for r in recent}
    assert audit.retention_deleted_total == 1345


async def v2_store(url: str | None, data_dir) -> None:
    """A store as version 2 made it, holding one decision written then."""
    types = sqlite_types if url is None else postgres_types
    statements = [schema.SCHEMA_TABLE.format(**types)]
    for version, sql in schema.pending(0, types):
        if version <= 2:
            statements += sql + [f"INSERT INTO sandgate_schema (version, applied_at) VALUES ({version}, '2025-01-01T00:00:00+00:00')"]
    statements.append("INSERT INTO audit_events (id, at, kind, path, decision) VALUES"
                      " ('0123456789abcdef0123456789abcdef', '2025-06-01T00:00:00+00:00', 'decision', '/old', 'allow')")
    if url is None:
        data_dir.mkdir(exist_ok=True)
        with sqlite3.connect(data_dir / SQLITE_FILE) as conn:
            for sql in statements:
                conn.execute(sql)
        return
    conn = await asyncpg.connect(url)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def test_db_migrate_upgrades_a_version_2_store(store_url, tmp_path):
    data_dir = tmp_path / "data"
    await v2_store(store_url, data_dir)
    for _ in range(2):  # and again: a no-op
        code, out, err = await sandgate_cli("db", "--data-dir", str(data_dir), "migrate",
                                            SANDGATE_DATABASE_URL=store_url)
        assert code == 0, err
    assert await schema_versions(store_url, data_dir) == list(schema.VERSIONS)
    store = await open_store(store_url, data_dir=str(data_dir))
    try:
        (old,) = await store.list_audit()
        assert (old.path, old.request_count, old.last_request_id, old.last_at, old.path_cut) == ("/old", 1, None, None, False)
        assert await store.write_audit([decision(request_count=5, last_request_id="r5", last_at=datetime.now(timezone.utc))]) == 1
    finally:
        await store.close()


async def test_postgres_tests_fail_instead_of_skipping_under_ci(monkeypatch):
    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required in CI"):
        async with fresh_database(nobody):
            pass
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        async with fresh_database(nobody):
            pass
