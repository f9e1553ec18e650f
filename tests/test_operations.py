"""Operations (SPEC §6, §2.1 reload): admin endpoints, metrics, access log, live reload of the
routes file, and draining.

The upstreams here can hold a request at a gate until the test releases it, so "in flight" is a
known state rather than a hoped-for timing.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gated import start_gated
from tests.support.harness import GATEWAY, access_records, admin_url, backend, route_to, running_gateway, url
from tests.support.rawhttp import KeptConnection

STEP = 5.0
ROUTE = "infra/app"


# --- upstreams with a gate ----------------------------------------------------------------------


@pytest.fixture
async def upstreams(aiohttp_server):
    return {name: await start_gated(aiohttp_server, name) for name in ("one", "two")}


def routes(ports: dict[str, int], target: str) -> str:
    return GATEWAY + "".join(backend(n, p) for n, p in ports.items()) + route_to(target, "app", rule_name="main")


def ports_of(upstreams) -> dict[str, int]:
    return {name: port for name, (_, port) in upstreams.items()}


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def backend_of(session: aiohttp.ClientSession, gw, path: str = "/probe") -> str:
    async with session.get(url(gw, path)) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["backend"]


# --- admin --------------------------------------------------------------------------------------


async def test_healthz_and_readyz_when_running(upstreams, tmp_path):
    async with running_gateway(tmp_path, routes(ports_of(upstreams), "one")) as gw, aiohttp.ClientSession() as session:
        async with session.get(admin_url(gw, "/healthz")) as resp:
            assert resp.status == 200
        async with session.get(admin_url(gw, "/readyz")) as resp:
            assert resp.status == 200
            assert (await resp.json())["ready"] is True
        # The admin endpoints are not on the public listener.
        async with session.get(url(gw, "/readyz")) as resp:
            assert (await resp.json())["backend"] == "one"


async def test_metrics_use_route_labels_never_raw_paths(upstreams, tmp_path):
    unique = f"/unique-{uuid.uuid4().hex}"
    async with running_gateway(tmp_path, routes(ports_of(upstreams), "one")) as gw, aiohttp.ClientSession() as session:
        for i in range(3):
            async with session.get(url(gw, f"{unique}/{i}?access_token=secret-{i}")) as resp:
                assert resp.status == 200
        async with session.post(url(gw, unique), data=b"x") as resp:
            assert resp.status == 200
        async with session.get(admin_url(gw, "/metrics")) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            text = await resp.text()

    assert unique not in text
    assert "secret" not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    requests = families["sandgate_requests"]
    assert requests.type == "counter"
    counts = {
        (s.labels["route"], s.labels["method"], s.labels["code"]): s.value
        for s in requests.samples
        if s.name == "sandgate_requests_total"
    }
    assert counts[(ROUTE, "GET", "200")] == 3
    assert counts[(ROUTE, "POST", "200")] == 1
    assert all(set(s.labels) == {"route", "method", "code"} for s in requests.samples if s.name.endswith("_total"))

    for name in ("sandgate_request_duration_seconds", "sandgate_upstream_duration_seconds"):
        family = families[name]
        assert family.type == "histogram", name
        for sample in family.samples:
            assert set(sample.labels) <= {"route", "le"}, (name, sample)
        count = next(s.value for s in family.samples if s.name == name + "_count" and s.labels["route"] == ROUTE)
        assert count == 4, name
        buckets = [s for s in family.samples if s.name == name + "_bucket" and s.labels["route"] == ROUTE]
        assert buckets and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 4


async def test_access_log_one_json_line_per_request_without_the_query(upstreams, tmp_path):
    async with running_gateway(tmp_path, routes(ports_of(upstreams), "one")) as gw, aiohttp.ClientSession() as session:
        ids = [f"req-{uuid.uuid4().hex}" for _ in range(3)]
        for n, request_id in enumerate(ids):
            async with session.get(
                url(gw, f"/things/{n}?access_token=secret-token-{n}&x=1"), headers={"X-Request-Id": request_id}
            ) as resp:
                assert resp.status == 200
                assert resp.headers["X-Request-Id"] == request_id
        async with session.get(url(gw, "/generated")) as resp:
            generated = resp.headers["X-Request-Id"]
        records = access_records(gw)
        raw = gw.log_buffer.getvalue()

    assert len(records) == 4
    by_id = {r["request_id"]: r for r in records}
    assert set(by_id) == {*ids, generated}
    for n, request_id in enumerate(ids):
        record = by_id[request_id]
        assert record["status"] == 200
        assert record["route"] == ROUTE
        assert record["path"] == f"/things/{n}"
    assert "secret" not in raw
    assert "access_token" not in raw


# --- routes reload --------------------------------------------------------------------------------


async def test_valid_routes_change_applies_live_keeping_connections_and_in_flight_requests(upstreams, tmp_path):
    ports = ports_of(upstreams)
    gate_one = upstreams["one"][0]
    async with running_gateway(tmp_path, routes(ports, "one"), reload_interval=0.2) as gw, \
            aiohttp.ClientSession() as session, aiohttp.ClientSession() as slow_session:
        kept = await KeptConnection.open(gw.addresses["http"], "app.example")
        try:
            before = await kept.get("/before")
            assert (before.status, before.json()) == (200, {"backend": "one", "path": "/before"})
            slow = asyncio.ensure_future(slow_session.get(url(gw, "/gate")))
            await asyncio.wait_for(gate_one.arrived.wait(), STEP)

            replace_file(Path(gw.options.routes), routes(ports, "two"))
            deadline = asyncio.get_running_loop().time() + STEP
            while await backend_of(session, gw) != "two":
                assert asyncio.get_running_loop().time() < deadline, "the new routes file was not applied"
                await asyncio.sleep(0.05)

            # The open keep-alive connection survived and its next request uses the new table.
            after = await kept.get("/after")
            assert (after.status, after.json()) == (200, {"backend": "two", "path": "/after"})
            # The request in flight during the swap finishes on the route it started on.
            assert not slow.done()
            gate_one.release.set()
            async with await asyncio.wait_for(slow, STEP) as resp:
                assert resp.status == 200
                assert (await resp.json())["backend"] == "one"
        finally:
            await kept.close()


def invalid_routes(kind: str, ports: dict[str, int]) -> str:
    if kind == "yaml-syntax":
        return "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: [unclosed\n"
    # otherwise well-formed YAML pointing at "two", with one schema error
    return routes(ports, "two").replace("- name: main", "- name: main\n    matches: [{path: {type: Bogus, value: /}}]")


@pytest.mark.parametrize("kind", ["yaml-syntax", "schema"])
async def test_invalid_routes_change_keeps_the_previous_table(upstreams, tmp_path, kind):
    ports = ports_of(upstreams)
    invalid = invalid_routes(kind, ports)
    async with running_gateway(tmp_path, routes(ports, "one")) as gw, aiohttp.ClientSession() as session:
        before = gw.table
        routes_file = Path(gw.options.routes)
        replace_file(routes_file, invalid)
        assert gw.reload() is False
        assert gw.table is before
        assert await backend_of(session, gw) == "one"
        async with session.get(admin_url(gw, "/readyz")) as resp:
            assert resp.status == 200  # a rejected reload does not make the process unready
        replace_file(routes_file, routes(ports, "two"))
        assert gw.reload() is True
        assert await backend_of(session, gw) == "two"


async def test_invalid_change_seen_by_the_watcher_keeps_serving(upstreams, tmp_path):
    ports = ports_of(upstreams)
    async with running_gateway(tmp_path, routes(ports, "one"), reload_interval=0.1) as gw, \
            aiohttp.ClientSession() as session:
        routes_file = Path(gw.options.routes)
        replace_file(routes_file, "kind: HTTPRoute\n  bad: [indent\n")
        loop = asyncio.get_running_loop()
        until = loop.time() + 0.5  # several watcher intervals
        while loop.time() < until:
            assert await backend_of(session, gw) == "one"
            await asyncio.sleep(0.05)
        replace_file(routes_file, routes(ports, "two"))
        deadline = loop.time() + STEP
        while await backend_of(session, gw) != "two":
            assert loop.time() < deadline, "a valid file after an invalid one was not applied"
            await asyncio.sleep(0.05)


# --- drain ----------------------------------------------------------------------------------------


async def _refused(address) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*address), STEP)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_drain_finishes_in_flight_requests_and_refuses_new_connections(upstreams, tmp_path):
    gate = upstreams["one"][0]
    async with running_gateway(tmp_path, routes(ports_of(upstreams), "one"), drain_seconds=10) as gw, \
            aiohttp.ClientSession() as session:
        address = gw.addresses["http"]
        admin = admin_url(gw, "/readyz")
        slow = asyncio.ensure_future(session.get(url(gw, "/gate")))
        await asyncio.wait_for(gate.arrived.wait(), STEP)

        drain = asyncio.ensure_future(gw.drain())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STEP
        async with aiohttp.ClientSession() as admin_session:
            while True:
                async with admin_session.get(admin) as resp:
                    if resp.status == 503:
                        assert (await resp.json())["ready"] is False
                        break
                assert loop.time() < deadline, "readyz did not turn 503 while draining"
                await asyncio.sleep(0.02)
        while not await _refused(address):
            assert loop.time() < deadline, "new connections still accepted while draining"
            await asyncio.sleep(0.02)

        assert not drain.done(), "drain returned while a request was still in flight"
        assert not slow.done()
        gate.release.set()
        async with await asyncio.wait_for(slow, STEP) as resp:
            assert resp.status == 200
            assert (await resp.json())["backend"] == "one"
        await asyncio.wait_for(drain, STEP)
