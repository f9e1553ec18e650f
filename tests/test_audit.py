"""The audit pipeline against real stores: nothing lost, nothing twice, across outages and restarts."""

from __future__ import annotations

import asyncio
import inspect
import time

import asyncpg
import pytest

from gateway.audit import AuditLog, AuditRecord
from gateway.audit.spool import SPOOL_FILE, Spool
from gateway.store import open_store
from tests.support.postgres import throwaway_cluster


@pytest.fixture
def cluster():
    with throwaway_cluster() as c:
        yield c


async def eventually(check, timeout: float = 15.0) -> None:
    """Wait until `check()`, a plain or an async predicate, holds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def count_is(store, expected: int) -> bool:
    return await store.count_audit() == expected


async def stored_ids(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [r["id"].hex for r in await conn.fetch("SELECT id FROM audit_events")]
    finally:
        await conn.close()


def spool_files(data_dir) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if p.name.startswith(SPOOL_FILE))


def decision(n: int) -> AuditRecord:
    return AuditRecord(kind="decision", route="infra/api/0", decision="allow", request_id=f"req-{n}",
                       detail={"token": "9f86d081884c7d65"})  # a fingerprint, never the token


async def test_a_database_restart_loses_and_duplicates_nothing(cluster, tmp_path):
    store = await open_store(cluster.url, data_dir=str(tmp_path))
    await store.migrate()
    spooled, depths = [], []
    audit = AuditLog(store, str(tmp_path), on_spooled=spooled.append, on_depth=depths.append)
    audit.start()
    produced: list[str] = []

    async def produce():
        for _ in range(30):  # 3,000 records over ~3 s
            for _ in range(100):
                rec = decision(len(produced))
                audit.record(rec)
                produced.append(rec.id)
            await asyncio.sleep(0.1)

    async def outage():
        await asyncio.sleep(1.0)
        await cluster.stop()
        await asyncio.sleep(1.0)
        await cluster.start()

    try:
        await asyncio.gather(produce(), outage())
        assert audit.spooled_total > 0, "the outage never reached the pipeline"
        assert sum(spooled) == audit.spooled_total
        # The replay loop, not stop(), brings the spool back once the database answers.
        await eventually(lambda: not spool_files(tmp_path))
    finally:
        await audit.stop()
        await store.close()
    ids = await stored_ids(cluster.url)
    assert len(ids) == len(produced) == 3000
    assert set(ids) == set(produced)
    assert spool_files(tmp_path) == []
    assert audit.queue_depth == 0 and depths[-1] == 0


async def test_stop_while_the_database_is_down_spools_and_the_next_run_replays_once(cluster, tmp_path):
    store = await open_store(cluster.url, data_dir=str(tmp_path))
    await store.migrate()
    audit = AuditLog(store, str(tmp_path))
    audit.start()
    before = [decision(n) for n in range(500)]
    for rec in before:
        audit.record(rec)
    await eventually(lambda: count_is(store, 500), timeout=5)
    await cluster.stop()
    during = [decision(n) for n in range(500, 1500)]
    for rec in during:
        audit.record(rec)
    await audit.stop()
    await store.close()
    assert audit.spooled_total == 1000
    assert len((tmp_path / SPOOL_FILE).read_text().splitlines()) == 1000

    await cluster.start()
    store = await open_store(cluster.url, data_dir=str(tmp_path))
    audit = AuditLog(store, str(tmp_path))
    audit.start()
    try:
        await eventually(lambda: not spool_files(tmp_path))
    finally:
        await audit.stop()
        await store.close()
    ids = await stored_ids(cluster.url)
    assert len(ids) == 1500
    assert set(ids) == {r.id for r in before + during}


async def test_a_crash_mid_replay_is_replayed_exactly_once(tmp_path):
    """A previous run set the spool aside, wrote part of it and died; then more was spooled."""
    store = await open_store(None, data_dir=str(tmp_path))
    await store.migrate()
    spool = Spool(str(tmp_path))
    interrupted = [decision(n) for n in range(1200)]
    spool.append(interrupted)
    assert spool.set_aside()
    await store.write_audit(interrupted[:700])
    later = [decision(n) for n in range(1200, 1300)]
    spool.append(later)

    audit = AuditLog(store, str(tmp_path))
    audit.start()
    try:
        await eventually(lambda: not spool_files(tmp_path), timeout=5)
    finally:
        await audit.stop()
    assert await store.count_audit() == 1300
    assert {r.id for r in await store.list_audit(limit=2000)} == {r.id for r in interrupted + later}
    await store.close()


def test_a_torn_spool_line_costs_only_itself(tmp_path):
    spool = Spool(str(tmp_path))
    first, second = [decision(n) for n in range(3)], [decision(n) for n in range(3, 5)]
    spool.append(first)
    with open(spool.path, "a") as f:
        f.write(decision(99).to_json()[:40])  # a crash in the middle of an append
    spool.append(second)
    assert spool.set_aside()
    replayed = [r for batch in spool.read_aside(2) for r in batch]
    assert replayed == first + second


async def test_records_reach_the_store_without_filling_a_batch(tmp_path):
    store = await open_store(None, data_dir=str(tmp_path))
    await store.migrate()
    audit = AuditLog(store, str(tmp_path))
    audit.start()
    try:
        for n in range(10):
            audit.record(decision(n))
        assert audit.queue_depth == 10
        await eventually(lambda: count_is(store, 10), timeout=1)
    finally:
        await audit.stop()
        await store.close()
    assert audit.spooled_total == 0 and spool_files(tmp_path) == []


async def test_with_neither_store_nor_spool_the_memory_queue_is_bounded_and_drops_are_counted(tmp_path, caplog):
    store = await open_store(None, data_dir=str(tmp_path))
    await store.migrate()
    await store.close()  # every write and ping fails from now on
    not_a_dir = tmp_path / "spool-here"
    not_a_dir.write_text("a file where the spool directory should be")  # every append fails
    dropped: list[int] = []
    audit = AuditLog(store, str(not_a_dir), batch_size=100, max_queued=700, on_dropped=dropped.append)
    audit.start()
    for n in range(2500):
        audit.record(decision(n))
    await eventually(lambda: audit.dropped_total >= 2500 - 700)
    assert audit.queue_depth <= 700 and audit.dropped_total + audit.queue_depth == 2500
    await audit.stop()
    assert audit.dropped_total == sum(dropped) == 2500 and audit.queue_depth == 0
    assert any("records dropped" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
