"""Audit through a running gateway (SPEC §6): every decision counted exactly once, none lost,
none twice, no credential in any record — across a PostgreSQL outage in the middle of the traffic,
with one record per request (`--audit-allowed every`) and with rollups (the default), whose
window the outage test shortens so that rollup records are made, spooled and replayed during it.

The gateway runs in-process on loopback against a throwaway PostgreSQL cluster that the test
stops (`pg_ctl stop -m fast`) and starts again while several clients keep sending requests.
The route's SecurityPolicy is JWT with an inline JWKS, so decisions never depend on the
database being up (API key lookups would). Records a drain leaves in the spool are replayed by
a second start on the same data dir before the exactly-once checks, so those checks and the
drain check (SPEC §6: the queue is flushed on SIGTERM) fail separately. The embedded default
store is checked the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sqlite3
import time
from collections import Counter

import aiohttp
import asyncpg
import pytest

from gateway.audit import AuditSettings
from gateway.audit.spool import SPOOL_FILE
from gateway.store import SQLITE_FILE
from tests.support.fixtures import upstream_port  # noqa: F401 (fixture)
from tests.support.harness import GATEWAY, access_records, backend, echo_routes, running_gateway, url
from tests.support.issuer import AUDIENCE, ISSUER, Issuer, claims
from tests.support.policy_harness import metric_value, security_policy, wait_for
from tests.support.postgres import throwaway_cluster
from tests.support.store_gateway import sandgate_cli

RATE = 500  # requests per second, from CLIENTS clients: ~1,500 requests over ~3 s
CLIENTS = 6
OUTAGE_AT = 0.8  # seconds into the traffic
OUTAGE = 1.5  # seconds between the stop returning and the start beginning
AFTER = 0.25  # seconds of traffic after the database is back, then the drain


@pytest.fixture
def cluster():
    with throwaway_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def issuer():
    return Issuer()  # keys and minting only: the gateway gets the JWKS inline


def policy(issuer: Issuer) -> str:
    return security_policy("jwt-inline", {
        "jwt": {"providers": [{
            "name": "idp", "issuer": ISSUER, "audiences": [AUDIENCE],
            "localJWKS": {"type": "Inline", "inline": json.dumps(issuer.jwks())},
        }]},
        "authorization": {"defaultAction": "Deny", "rules": [
            {"name": "readers", "action": "Allow", "principal": {"jwt": {"provider": "idp", "scopes": ["echo:read"]}}},
        ]},
    })


def credentials(issuer: Issuer) -> list[dict[str, str]]:
    """The request mix: allowed, 403 (scope), 401 (forged signature), 401 (no token)."""
    good = issuer.mint(claims(sub="reader", scope="echo:read"))
    unscoped = issuer.mint(claims(sub="guest", scope="profile"))
    forged = issuer.mint(claims(sub="admin", scope="echo:read"), key=issuer.attacker, kid="rsa-1")
    return [{"Authorization": f"Bearer {t}"} for t in (good, unscoped, forged)] + [{}]


def secrets_of(mix: list[dict[str, str]]) -> list[str]:
    """Each token whole and its signature alone: neither may appear in a record."""
    tokens = [h["Authorization"].removeprefix("Bearer ") for h in mix if h]
    return tokens + [t.rsplit(".", 1)[1] for t in tokens]


async def send_load(running, mix, seen: dict[str, int], times: dict[str, float], errors: list[str], *,
                    total: int | None = None, until: asyncio.Event | None = None) -> int:
    """Requests at RATE per second from CLIENTS clients, `total` of them or until `until` is set;
    returns how many were sent. Request i is due at i/RATE seconds."""
    start = time.monotonic()
    counter = iter(range(total) if total is not None else itertools.count())
    sent = 0

    async def client():
        nonlocal sent
        async with aiohttp.ClientSession() as session:
            for i in counter:
                delay = start + i / RATE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if until is not None and until.is_set():
                    return
                sent += 1
                try:
                    async with session.get(url(running, f"/item/{i}"), headers=mix[i % len(mix)]) as response:
                        await response.read()
                        request_id = response.headers["X-Request-Id"]
                        assert request_id not in seen, "the gateway reused a request id"
                        seen[request_id] = response.status
                        times[request_id] = time.monotonic()
                except (aiohttp.ClientError, KeyError, asyncio.TimeoutError) as e:
                    errors.append(f"request {i}: {e!r}")

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return sent


async def decision_count(database_url: str) -> int:
    """How many requests the stored decision records stand for (a rollup record for many)."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT coalesce(sum(request_count), 0) FROM audit_events WHERE kind = 'decision'")
    finally:
        await conn.close()


def check_audit_ids(lines: list[dict], stored: dict[str, tuple[int, str]], seen: dict[str, int]) -> None:
    """Each access-log line names the record that counts its request (`audit_id`): every record
    is named by exactly as many lines as its request_count, and agrees with their status."""
    assert {line["request_id"] for line in lines} == seen.keys(), "an answered request has no access-log line"
    named = Counter(line["audit_id"] for line in lines)
    counts = {record_id: count for record_id, (count, _) in stored.items()}
    assert named == counts, f"records and the access-log lines naming them disagree: {set(named.items()) ^ set(counts.items())}"
    wrong = [line for line in lines if (seen[line["request_id"]] == 200) != (stored[line["audit_id"]][1] == "allow")]
    assert wrong == [], f"{len(wrong)} requests counted under a record of the other decision, e.g. {wrong[:2]}"


async def metric_above(running, name: str, floor: float) -> bool:
    return await metric_value(running, name) > floor


def spooled_lines(data_dir) -> int:
    return sum(len(p.read_text().splitlines()) for p in data_dir.glob(SPOOL_FILE + "*"))


@pytest.mark.parametrize("audit", [AuditSettings(allowed="every"), AuditSettings(rollup_window=0.3)], ids=["every", "rollup"])
async def test_a_database_outage_under_load_loses_duplicates_and_leaks_nothing(cluster, issuer, upstream_port, tmp_path, audit):
    mix = credentials(issuer)
    seen: dict[str, int] = {}
    times: dict[str, float] = {}
    errors: list[str] = []
    outage: list[float] = []
    spooled_max = 0.0

    done = asyncio.Event()
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer),
                               database_url=cluster.url, audit=audit) as running:
        traffic = asyncio.ensure_future(send_load(running, mix, seen, times, errors, until=done))

        async def outage_then_recovery():
            await asyncio.sleep(OUTAGE_AT)
            await cluster.stop()
            outage.append(time.monotonic())
            await asyncio.sleep(OUTAGE)
            outage.append(time.monotonic())
            await cluster.start()
            outage.append(time.monotonic())
            await asyncio.sleep(AFTER)
            done.set()

        async def scrape():
            nonlocal spooled_max
            while not traffic.done():
                spooled_max = max(spooled_max, await metric_value(running, "sandgate_audit_spooled_total"))
                await asyncio.sleep(0.1)

        total = (await asyncio.gather(traffic, outage_then_recovery(), scrape()))[0]
        spooled_max = max(spooled_max, await metric_value(running, "sandgate_audit_spooled_total"))
        lines = access_records(running)
        drained_at = time.monotonic()
        await running.drain()

    assert errors == [], errors[:5]
    assert len(seen) == total > 1000, (len(seen), total)
    statuses = Counter(seen.values())
    assert set(statuses) <= {200, 401, 403}, statuses
    down, up, back = outage
    during = sum(1 for t in times.values() if down <= t <= up)
    assert during > 100, f"only {during} requests were answered while the database was down"
    assert spooled_max > 0, "sandgate_audit_spooled_total never rose during the outage"

    after_drain = await decision_count(cluster.url)
    left = spooled_lines(tmp_path / "data")
    if left:
        # What a graceful restart does with them: the next start on the same data dir replays.
        async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer),
                                   database_url=cluster.url, audit=audit) as again:
            deadline = time.monotonic() + 5
            while spooled_lines(tmp_path / "data") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await again.drain()

    conn = await asyncpg.connect(cluster.url)
    try:
        rows = await conn.fetch("SELECT id, request_id, last_request_id, request_count, decision FROM audit_events"
                                " WHERE kind = 'decision'")
        leaks = {s[:12]: await conn.fetchval(
            "SELECT count(*) FROM audit_events WHERE strpos(row_to_json(audit_events)::text, $1) > 0", s)
            for s in secrets_of(mix)}
    finally:
        await conn.close()

    stored_total = sum(r["request_count"] for r in rows)
    assert stored_total == total, f"{stored_total} decisions stored for {total} requests, even after a restart replayed the spool"
    assert len({r["id"] for r in rows}) == len(rows), "a record was stored twice"
    counted = [rid for r in rows for rid in (r["request_id"], r["last_request_id"]) if rid is not None]
    assert len(set(counted)) == len(counted) and set(counted) <= seen.keys(), "a request was counted twice or never sent"
    check_audit_ids(lines, {r["id"].hex: (r["request_count"], r["decision"]) for r in rows}, seen)
    decisions = Counter()
    for r in rows:
        decisions[r["decision"]] += r["request_count"]
    assert decisions == {"allow": statuses[200], "deny": statuses[401] + statuses[403]}, (decisions, statuses)
    if audit.allowed == "every":
        assert len(rows) == total and all(r["request_count"] == 1 for r in rows)
    else:
        rollups = [r for r in rows if r["last_request_id"] is not None]
        assert len(rows) < total / 10, f"{len(rows)} records for {total} requests of 4 credentials: no rollup"
        assert len(rollups) > 8, "the short window should have closed rollups during the traffic"
    assert all(v == 0 for v in leaks.values()), f"records hold a token: {leaks}"
    # SPEC §6: on drain the audit queue is flushed, and the database was up again by then
    assert after_drain == total and left == 0, (
        f"after the drain only {after_drain} of {total} decisions were in the database and {left} were "
        f"still in the spool, though the database had been up for {drained_at - back:.1f} s")


@pytest.mark.parametrize("audit", [AuditSettings(allowed="every"), AuditSettings()], ids=["every", "rollup"])
async def test_a_drain_right_after_the_database_returns_writes_the_spool_to_it(cluster, issuer, upstream_port, tmp_path, audit):
    """The same drain without the race: nothing is sent after the restart, so the replay loop's
    own probe (1 s, backing off to 10 s) cannot have emptied the spool before the drain. In
    rollup mode the drain also closes the open rollups: their counts reach the store too."""
    mix = credentials(issuer)
    seen: dict[str, int] = {}
    errors: list[str] = []
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer),
                               database_url=cluster.url, audit=audit) as running:
        await send_load(running, mix, seen, {}, errors, total=40)
        await cluster.stop()
        # New tokens (fresh jti): first-seen decisions, stored on their own even in rollup mode
        await send_load(running, credentials(issuer), seen, {}, errors, total=40)
        assert await wait_for(lambda: metric_above(running, "sandgate_audit_spooled_total", 0)), "nothing was spooled"
        await cluster.start()
        await running.drain()
    assert errors == [] and len(seen) == 80
    stored, left = await decision_count(cluster.url), spooled_lines(tmp_path / "data")
    assert (stored, left) == (80, 0), f"after the drain {stored} of 80 decisions were stored, {left} left in the spool"


async def test_the_embedded_default_stores_decisions_in_the_data_dir(issuer, upstream_port, tmp_path):
    mix = credentials(issuer)
    seen: dict[str, int] = {}
    errors: list[str] = []
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer)) as running:
        assert running.options.database_url is None
        await send_load(running, mix, seen, {}, errors, total=80)
        lines = access_records(running)
        await running.drain()
    assert errors == [] and len(seen) == 80

    data = tmp_path / "data"
    with sqlite3.connect(data / SQLITE_FILE) as conn:
        rows = conn.execute("SELECT id, request_count, decision, last_request_id FROM audit_events"
                            " WHERE kind = 'decision'").fetchall()
    # The default is rollup: 3 tokens and no token, each decided 20 times in well under 60 s,
    # make 4 first-seen records and 4 rollup records of 19 requests each.
    assert sorted(count for _, count, _, _ in rows) == [1] * 4 + [19] * 4, rows
    check_audit_ids(lines, {rid: (count, decision) for rid, count, decision, _ in rows}, seen)
    assert Counter(seen.values()) == {200: 20, 403: 20, 401: 40}
    files = [p for p in data.iterdir() if p.is_file()]
    assert not any(p.name.startswith(SPOOL_FILE) for p in files), "the embedded store was never down: nothing to spool"
    for path in files:
        content = path.read_bytes()
        for secret in secrets_of(mix):
            assert secret.encode() not in content, f"{path.name} holds a token"


# --- volume (SPEC §6): rollups, paths cut, the capped spool -------------------------------------

async def send(running, paths: list[str], headers: dict[str, str], method: str = "GET") -> list[str]:
    """One request per path, in order; their request ids."""
    ids = []
    async with aiohttp.ClientSession() as session:
        for path in paths:
            async with session.request(method, url(running, path), headers=headers) as response:
                await response.read()
                ids.append(response.headers["X-Request-Id"])
    return ids


def stored_decisions(data_dir) -> list[sqlite3.Row]:
    """The embedded store's decision records, oldest first."""
    with sqlite3.connect(data_dir / SQLITE_FILE) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM audit_events WHERE kind = 'decision' ORDER BY at, id").fetchall()


async def test_repeats_of_a_decision_are_one_rollup_record_with_the_exact_count(issuer, upstream_port, tmp_path):
    good, unscoped, forged, anonymous = credentials(issuer)
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer)) as running:
        # The path is not part of the key: a rollup keeps the first path.
        allowed = await send(running, [f"/docs/{i % 3}" for i in range(7)], good)
        denied = await send(running, ["/x"] * 5, anonymous)
        lines = {line["request_id"]: line for line in access_records(running)}
    by_request = {r["request_id"]: r for r in stored_decisions(tmp_path / "data")}

    first, rollup = by_request[allowed[0]], by_request[allowed[1]]
    assert (first["request_count"], first["last_request_id"], first["path"]) == (1, None, "/docs/0")
    assert (rollup["request_count"], rollup["last_request_id"], rollup["path"]) == (6, allowed[-1], "/docs/0")
    assert rollup["at"] < rollup["last_at"] and rollup["decision"] == "allow"
    assert lines[allowed[0]]["audit_id"] == first["id"]
    assert {lines[rid]["audit_id"] for rid in allowed[1:]} == {rollup["id"]}, "a repeat's audit id is its rollup's"
    # Denials roll up the same way after the first.
    assert [(by_request[rid]["request_count"], by_request[rid]["last_request_id"]) for rid in denied[:2]] == [
        (1, None), (4, denied[-1])]
    assert len(by_request) == 4


async def test_repeats_roll_up_per_route_rule_even_under_a_policy_on_the_whole_route(issuer, upstream_port, tmp_path):
    """SPEC §6's key is the route rule: a policy attached to the route governs both of its rules,
    and the repeats of each rule are counted in a rollup of their own."""
    routes = GATEWAY + backend("echo", upstream_port) + """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: infra}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: echo}]
  - matches: [{path: {type: PathPrefix, value: /b}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: echo}]
"""
    good = credentials(issuer)[0]
    async with running_gateway(tmp_path, routes, policies_yaml=policy(issuer)) as running:
        ids = await send(running, ["/a/1", "/b/1", "/a/2", "/b/2", "/a/3"], good)
    by_request = {r["request_id"]: r for r in stored_decisions(tmp_path / "data")}
    firsts = sorted((r["path"], r["request_count"]) for r in by_request.values() if r["last_request_id"] is None)
    rollups = sorted((r["path"], r["request_count"], r["last_request_id"]) for r in by_request.values()
                     if r["last_request_id"] is not None)
    assert firsts == [("/a/1", 1), ("/b/1", 1)]
    assert rollups == sorted([("/a/1", 2, ids[4]), ("/b/1", 1, ids[3])])


async def test_a_rollup_is_stored_when_its_window_closes_and_the_next_repeat_starts_anew(issuer, upstream_port, tmp_path):
    good = credentials(issuer)[0]
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer),
                               audit=AuditSettings(rollup_window=0.5)) as running:
        early = await send(running, ["/a"] * 4, good)

        async def rollup_stored() -> bool:
            return await running.store.count_audit(kind="decision", last_request_id=early[-1]) == 1

        assert await wait_for(rollup_stored, timeout=10), "the rollup was not stored when its window closed"
        late = await send(running, ["/a"] * 3, good)
    records = stored_decisions(tmp_path / "data")
    assert [(r["request_id"], r["request_count"], r["last_request_id"]) for r in records] == [
        (early[0], 1, None), (early[1], 3, early[-1]), (late[0], 1, None), (late[1], 2, late[-1])]


async def test_with_audit_allowed_every_each_request_has_its_record(issuer, upstream_port, tmp_path):
    good = credentials(issuer)[0]
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer),
                               audit=AuditSettings(allowed="every")) as running:
        sent = await send(running, ["/a"] * 6, good)
        lines = access_records(running)
    records = stored_decisions(tmp_path / "data")
    assert [r["request_id"] for r in records] == sent and {r["request_count"] for r in records} == {1}
    assert [line["audit_id"] for line in lines] == [r["id"] for r in records]


async def test_the_rollup_table_is_bounded_against_a_flood_of_distinct_credentials(issuer, upstream_port, tmp_path):
    """Each token is a key of its own; the table closes its oldest slots to stay within its
    count and byte bounds, and their counts are still stored, exactly."""
    tokens = [issuer.mint(claims(sub="reader", scope="echo:read")) for _ in range(40)]
    bounds = AuditSettings(rollup_max_slots=16, rollup_max_bytes=6 * 1024)  # a slot is ~500 bytes: both bite
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer), audit=bounds) as running:
        rollups = running.gateway.audit.rollups
        for token in tokens:
            await send(running, ["/m", "/m", "/m"], {"Authorization": f"Bearer {token}"})
            assert len(rollups) <= 16 and rollups.bytes <= 6 * 1024, (len(rollups), rollups.bytes)
        assert rollups.evicted_total >= len(tokens) - 16
    records = stored_decisions(tmp_path / "data")
    assert sum(r["request_count"] for r in records) == 3 * len(tokens)
    assert sorted(Counter(r["detail"] for r in records).values()) == [2] * len(tokens), "per token: a first, a rollup"


async def test_a_long_path_is_stored_cut_at_2_kib_and_marked(issuer, upstream_port, tmp_path):
    """A path is client input kept for the whole retention (multi-byte text: tests/test_store.py)."""
    long_path = "/" + "a" * 10_239  # 10 KiB
    exactly = "/" + "b" * 2047
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer),
                               audit=AuditSettings(allowed="every")) as running:
        ids = await send(running, [long_path, exactly, "/short"], {})
        lines = {line["request_id"]: line for line in access_records(running)}
    by_request = {r["request_id"]: r for r in stored_decisions(tmp_path / "data")}
    cut, whole, short = (by_request[rid] for rid in ids)
    assert (cut["path"], cut["path_cut"]) == (long_path[:2048], 1)
    assert (whole["path"], whole["path_cut"]) == (exactly, 0)
    assert (short["path"], short["path_cut"]) == ("/short", 0)
    assert lines[ids[0]]["audit_id"] == cut["id"]


async def test_a_full_spool_drops_counts_and_logs_what_it_cannot_keep(cluster, issuer, upstream_port, tmp_path, caplog):
    cap = 5000  # a few records' worth
    mix = credentials(issuer)
    seen: dict[str, int] = {}
    errors: list[str] = []
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=policy(issuer),
                               database_url=cluster.url, audit=AuditSettings(allowed="every", spool_max_bytes=cap)) as running:
        await cluster.stop()
        await send_load(running, mix, seen, {}, errors, total=120)
        assert await wait_for(lambda: metric_above(running, "sandgate_audit_dropped_total", 0)), "nothing was counted as dropped"
        spool = tmp_path / "data" / SPOOL_FILE
        assert 0 < spool.stat().st_size <= cap
        kept = spooled_lines(tmp_path / "data")
        await asyncio.sleep(0.5)  # the writer flushes every 200 ms
        dropped = await metric_value(running, "sandgate_audit_dropped_total")
        spooled = await metric_value(running, "sandgate_audit_spooled_total")
        await cluster.start()
        await running.drain()
    assert errors == [] and len(seen) == 120
    assert spooled == kept and spooled + dropped == 120, (spooled, dropped)
    assert await decision_count(cluster.url) == kept, "the spool's records reach the store once it is back"
    assert any("spool is full" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records
               if r.name == "sandgate.audit" and r.levelno >= logging.ERROR), "the drop was not logged"


@pytest.mark.parametrize("args, env, flag", [
    (["--audit-allowed", "some"], {}, "--audit-allowed"),
    ([], {"SANDGATE_AUDIT_ALLOWED": "all"}, "--audit-allowed"),
    (["--audit-retention", "forever"], {}, "--audit-retention"),
    (["--audit-spool-max", "2TB"], {}, "--audit-spool-max"),
    ([], {"SANDGATE_AUDIT_SPOOL_MAX": "-5"}, "--audit-spool-max"),
])
async def test_a_bad_audit_flag_stops_serve_naming_it(args, env, flag):
    code, _, err = await sandgate_cli("serve", "--routes", "/nonexistent.yaml", *args, **env)
    assert code == 2 and f"argument {flag}:" in err, err
