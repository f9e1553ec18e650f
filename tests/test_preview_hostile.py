"""Previews under hostile input (SPEC §5): guessed hosts against the API server's budget, tokens
kept out of logs and audit records, caps under parallel creates, streams that end with their
preview, and cookies that never cross from the platform to a preview."""

from __future__ import annotations

import asyncio
import json
from time import monotonic

import aiohttp

from gateway.audit import AuditSettings
from gateway.preview.table import LOOKUP_BURST, LOOKUP_RATE
from gateway.preview.tokens import fingerprint, new_token
from tests.support.fixtures import issuer, world  # noqa: F401 - fixtures
from tests.support.harness import access_records, running_gateway, url
from tests.support.policy_harness import wait_for
from tests.support.previews import (
    LOOPBACK, ZONE, api, host_of, preview_policies, preview_routes, token_for, via_host,
)
from tests.support.previews import preview_gateway as gateway
from tests.support.sandboxes import CLAIM_API, SANDBOX_API

FAST_REAPER = {"reap_interval": 0.2, "touch_interval": 0.2}


def preview_gets(world, since: int) -> list:
    return [r for r in world.api.requests[since:] if r[0] == "GET" and "/httproutes/preview-" in r[1]]


async def test_distinct_guessed_hosts_cost_the_api_server_one_budget(tmp_path, world, issuer):
    await world.add("agents", "box-1", owner="alice@example.com")
    hosts = [f"{new_token()}-preview.{ZONE}" for _ in range(600)]
    async with gateway(tmp_path, world, issuer) as gw, aiohttp.ClientSession() as session:
        async def status_of(host: str) -> int:
            async with session.get(url(gw, "/"), headers={"Host": host}) as response:
                await response.read()
                return response.status

        before = len(world.api.requests)
        started = monotonic()
        statuses = []
        for i in range(0, len(hosts), 60):
            statuses += await asyncio.gather(*(status_of(h) for h in hosts[i:i + 60]))
        elapsed = monotonic() - started
        lookups = preview_gets(world, before)
    assert statuses == [404] * len(hosts)
    assert 1 <= len(lookups) <= LOOKUP_RATE * elapsed + LOOKUP_BURST + 1, (len(lookups), elapsed)


async def test_concurrent_requests_for_one_unknown_host_share_one_lookup(tmp_path, world, issuer):
    await world.add("agents", "box-1", owner="alice@example.com")
    host = f"{new_token()}-preview.{ZONE}"
    async with gateway(tmp_path, world, issuer) as gw:
        before = len(world.api.requests)
        results = await asyncio.gather(*(via_host(gw, host) for _ in range(40)))
        lookups = preview_gets(world, before)
    assert [r[0] for r in results] == [404] * 40
    assert len(lookups) == 1


async def test_preview_tokens_reach_neither_the_access_log_nor_the_audit_store(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice = token_for(issuer)
    # one audit record per request, so that each request's recorded path can be read back
    async with gateway(tmp_path, world, issuer, audit=AuditSettings(allowed="every")) as gw:
        _, created = await api(gw, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port})
        token = created["token"]
        got = await api(gw, "GET", f"/gateway/v1/previews/{token}", alice)
        shouted = await api(gw, "GET", f"/gateway/v1/previews/{token.upper()}", alice)
        padded = await api(gw, "GET", f"/gateway/v1/previews/{token}a/keepalive", alice)
        suffixed = await api(gw, "GET", f"/gateway/v1/previews/{token};x", alice)
        kept = await api(gw, "POST", f"/gateway/v1/previews/{token}/keepalive", alice)
        deleted = await api(gw, "DELETE", f"/gateway/v1/previews/{token}", alice)
        lines = access_records(gw)

        async def audited():
            return sum(r.kind == "decision" for r in await gw.store.list_audit(limit=1000)) >= 7

        assert await wait_for(audited, timeout=5)
        records = await gw.store.list_audit(limit=1000)
    assert (got[0], shouted[0], padded[0], suffixed[0], kept[0], deleted[0]) == (200, 404, 404, 404, 200, 204)
    api_lines = [line for line in lines if "/gateway/v1/previews/" in line["path"]]
    assert len(api_lines) == 6
    assert [line["path"].split("/")[4] for line in api_lines[:2]] == [fingerprint(token)] * 2, api_lines
    decisions = [r for r in records if r.kind == "decision" and r.path and "/gateway/v1/previews/" in r.path]
    assert len(decisions) == 6 and fingerprint(token) in {r.path.split("/")[4] for r in decisions}
    everything = (json.dumps(lines) + json.dumps([repr(r) for r in records])).lower()
    assert token[:20] not in everything and token[6:] not in everything


def create_body(sandbox: str, port: int) -> dict:
    return {"namespace": "agents", "sandbox": sandbox, "port": port}


async def test_parallel_creates_never_pass_the_per_sandbox_and_total_caps(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com", shared_with="bob@example.com")
    _, other_port = await world.add("agents", "box-2", owner="bob@example.com")
    alice, bob = token_for(issuer), token_for(issuer, "bob@example.com")
    async with gateway(tmp_path, world, issuer, max_per_sandbox=7, max_total=9, maxPerOwner=50) as gw:
        first = await asyncio.gather(*(api(gw, "POST", "/gateway/v1/previews", who, create_body("box-1", port))
                                       for who in [alice, bob] * 15))
        second = await asyncio.gather(*(api(gw, "POST", "/gateway/v1/previews", bob, create_body("box-2", other_port))
                                        for _ in range(25)))
        routes = world.api.list("gateway.networking.k8s.io/v1", "HTTPRoute", "agents")
        services = world.api.list("v1", "Service", "agents")
    assert sorted(s for s, _ in first) == [201] * 7 + [429] * 23
    assert sorted(s for s, _ in second) == [201] * 2 + [429] * 23  # the total of 9 is reached
    assert {b["error"] for s, b in first + second if s == 429} == {"preview_limit"}
    assert len(routes) == len(services) == 9


async def test_parallel_creates_never_pass_the_per_owner_cap(tmp_path, world, issuer):
    ports = {}
    for name in ("box-1", "box-2", "box-3"):
        _, ports[name] = await world.add("agents", name, owner="alice@example.com")
    _, bob_port = await world.add("agents", "bobs", owner="bob@example.com")
    alice, bob = token_for(issuer), token_for(issuer, "bob@example.com")
    async with gateway(tmp_path, world, issuer, maxPerOwner=4) as gw:
        results = await asyncio.gather(*(api(gw, "POST", "/gateway/v1/previews", alice, create_body(name, ports[name]))
                                         for name in list(ports) * 12))
        bobs = await api(gw, "POST", "/gateway/v1/previews", bob, create_body("bobs", bob_port))
    assert sorted(s for s, _ in results) == [201] * 4 + [429] * 32
    assert bobs[0] == 201  # one owner's cap leaves the others theirs


async def test_a_failed_create_gives_its_place_under_the_cap_back(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice = token_for(issuer)
    async with gateway(tmp_path, world, issuer, max_per_sandbox=1) as gw:
        world.api.fail_next("POST", "httproutes", status=500)
        failed = await api(gw, "POST", "/gateway/v1/previews", alice, create_body("box-1", port))
        created = await api(gw, "POST", "/gateway/v1/previews", alice, create_body("box-1", port))
    assert failed[0] == 502 and created[0] == 201


def streaming_app():
    """A sandbox app with an endless stream (/stream) and a WebSocket that stays open (/ws)."""
    from aiohttp import web

    async def stream(request):
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)
        for _ in range(600):
            await response.write(b"tick\n")
            await asyncio.sleep(0.1)
        return response

    async def ws(request):
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            await socket.send_str(message.data)
        return socket

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", ws)
    return app


async def open_stream_and_socket(gw, session, host):
    """A streamed response and a WebSocket through the preview host, both seen working."""
    stream = await session.get(url(gw, "/stream"), headers={"Host": host})
    assert stream.status == 200 and await stream.content.readline() == b"tick\n"
    socket = await session.ws_connect(url(gw, "/ws"), headers={"Host": host})
    await socket.send_str("hello")
    assert (await socket.receive(timeout=5)).data == "hello"
    return stream, socket


async def ended_within(stream, socket, seconds: float) -> tuple[float, int | None]:
    """How long until both the stream and the WebSocket ended (or `seconds`), and the close code."""
    started = monotonic()

    async def drain():
        try:
            while await stream.content.readline():
                pass
        except aiohttp.ClientError:
            pass  # cut: what a client of a cut stream sees

    async def closed():
        message = await socket.receive()
        return message.data if message.type == aiohttp.WSMsgType.CLOSE else socket.close_code

    _, code = await asyncio.wait_for(asyncio.gather(drain(), closed()), seconds)
    return monotonic() - started, code


async def test_deleting_a_preview_ends_its_websockets_and_streams(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com", app=streaming_app())
    alice = token_for(issuer)
    async with gateway(tmp_path, world, issuer) as gw, aiohttp.ClientSession() as session:
        _, created = await api(gw, "POST", "/gateway/v1/previews", alice, create_body("box-1", port))
        stream, socket = await open_stream_and_socket(gw, session, host_of(created))
        deleted = await api(gw, "DELETE", f"/gateway/v1/previews/{created['token']}", alice)
        took, code = await ended_within(stream, socket, 3.0)
    assert deleted[0] == 204
    assert took < 3.0 and code == 1001


async def test_a_preview_deleted_on_another_replica_or_expired_ends_its_streams(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com", app=streaming_app())
    alice = token_for(issuer)
    routes = preview_routes(max_lifetime="4s")
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    slow_reaper = {"reap_interval": 3600}
    async with gateway(tmp_path / "r1", world, issuer, routes=routes, timing=slow_reaper) as one, \
            gateway(tmp_path / "r2", world, issuer, routes=routes, timing=slow_reaper) as two, \
            aiohttp.ClientSession() as session:
        _, elsewhere = await api(one, "POST", "/gateway/v1/previews", alice, create_body("box-1", port))
        _, expiring = await api(one, "POST", "/gateway/v1/previews", alice, create_body("box-1", port))
        stream, socket = await open_stream_and_socket(two, session, host_of(elsewhere))
        await api(one, "DELETE", f"/gateway/v1/previews/{elsewhere['token']}", alice)  # two learns it from the watch
        deleted_took, deleted_code = await ended_within(stream, socket, 3.0)
        stream, socket = await open_stream_and_socket(two, session, host_of(expiring))
        expired_took, expired_code = await ended_within(stream, socket, 8.0)  # no reaper: the time is up
    assert deleted_took < 3.0 and deleted_code == 1001
    assert expired_code == 1001 and expired_took < 6.0


async def test_preview_requests_carry_no_platform_cookie_and_responses_no_referrer(tmp_path, world, issuer):
    from aiohttp import web

    from tests.support.policy_harness import provider, route_target, security_policy

    seen = []

    async def app_handler(request):
        seen.append(request.headers.getall("Cookie", []))
        return web.json_response({"ok": True}, headers={"Referrer-Policy": "unsafe-url"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", app_handler)
    _, port = await world.add("agents", "box-1", owner="alice@example.com", app=app)
    alice = token_for(issuer)
    # a second SecurityPolicy (on another route) reads its credential from a cookie of its own name
    policies = preview_policies(issuer) + security_policy(
        "console-jwt", {"jwt": {"providers": [provider(issuer, extractFrom={"cookies": ["console_session"]})]}},
        targets=[route_target("console")], namespace="platform")
    routes = preview_routes() + """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: console, namespace: platform}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /console}}]
    backendRefs: [{group: sandgate.dev, kind: PreviewZone, name: previews}]
"""
    async with running_gateway(tmp_path, routes, settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                               policies_yaml=policies) as gw:
        _, created = await api(gw, "POST", "/gateway/v1/previews", alice, create_body("box-1", port))
        status, headers, _ = await via_host(gw, host_of(created), headers={"Cookie": (
            f"console_session={alice}; IdToken-6f1c2a={alice}; BearerToken-0b9e={alice}; OauthHMAC-77=sig; "
            "cart=3; IdTokenish=own")})
    assert status == 200
    assert seen == [["cart=3; IdTokenish=own"]]
    assert headers["Referrer-Policy"] == "no-referrer"


def test_check_warns_when_a_zone_shares_the_platforms_registrable_domain(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from gateway.cli import main

    shipped = tmp_path / "routes.yaml"
    routes_text = (Path(__file__).parents[1] / "routes.yaml").read_text()
    shipped_policies = str(Path(__file__).parents[1] / "policies")

    def check(zone: str, public_url: str | None) -> str:
        zone_line = next(line for line in routes_text.splitlines() if line.startswith("  zone: "))
        host_line = next(line for line in routes_text.splitlines() if line.startswith('  - "*.'))
        shipped.write_text(routes_text.replace(zone_line, f"  zone: {zone}").replace(host_line, f'  - "*.{zone}"'))
        if public_url is None:
            monkeypatch.delenv("SANDGATE_PUBLIC_URL", raising=False)
        else:
            monkeypatch.setenv("SANDGATE_PUBLIC_URL", public_url)
        assert main(["check", "--routes", str(shipped), "--policies", shipped_policies]) == 0
        return "\n".join(line for line in capsys.readouterr().out.splitlines() if "PreviewZone" in line)

    assert "registrable domain shop.co.uk" in check("previews.shop.co.uk", "https://www.shop.co.uk")
    assert check("previews.shop-content.co.uk", "https://www.shop.co.uk") == ""  # co.uk is a public suffix
    assert check("apps.platform-usercontent.example", "https://platform.example") == ""
    assert check("below.platform.example", "https://platform.example") != ""
    assert check("previews.example.org", None) == ""


async def test_hostile_preview_httproutes_neither_take_a_host_nor_stop_the_reaper(tmp_path, world, issuer):
    """Whoever may write HTTPRoutes in a sandbox namespace can label one a preview: one naming
    another preview's host, or with a time the reaper cannot compare, is no preview."""
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    _, evil_port = await world.add("agents", "evil", owner="mallory@example.com")
    alice = token_for(issuer)
    async with gateway(tmp_path, world, issuer, routes=preview_routes(idle_ttl="1s"), timing=FAST_REAPER) as gw:
        _, victim = await api(gw, "POST", "/gateway/v1/previews", alice, create_body("box-1", port))
        route = world.api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "agents", f"preview-{victim['token']}")

        def hostile(token: str, host: str, **annotations) -> dict:
            meta = route["metadata"]
            return {**route, "metadata": {
                "name": f"preview-{token}", "namespace": "agents",
                "labels": {**meta["labels"], "sandgate.dev/sandbox": "evil"},
                "annotations": {**meta["annotations"], "sandgate.dev/port": str(evil_port), **annotations},
            }, "spec": {**route["spec"], "hostnames": [host]}}

        world.api.create(hostile(new_token(), host_of(victim)))  # claims the victim's host
        naive = new_token()
        world.api.create(hostile(naive, f"{naive}-preview.{ZONE}", **{"sandgate.dev/expires-at": "2020-01-01T00:00:00"}))
        served = []
        for _ in range(8):  # while the watch delivers both; the traffic keeps the victim alive
            served.append(await via_host(gw, host_of(victim)))
            await asyncio.sleep(0.2)
        naive_served = await via_host(gw, f"{naive}-preview.{ZONE}")

        async def reaped():
            return world.api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "agents", f"preview-{victim['token']}") is None

        assert await wait_for(reaped, timeout=5)  # the reaper kept running: the victim idled out
    assert [(s, body["backend"]) for s, _, body in served] == [(200, "agents/box-1")] * 8
    assert naive_served[0] == 404


async def test_owner_mode_streams_end_when_their_caller_loses_the_sandbox(tmp_path, world, issuer):
    from gateway.kube import SANDBOX_CLAIM, KubeClient
    from tests.support.policy_harness import provider, route_target, security_policy

    _, port = await world.add("agents", "box-1", owner="alice@example.com", shared_with="bob@example.com",
                              app=streaming_app())
    alice, bob = token_for(issuer), token_for(issuer, "bob@example.com")
    policies = preview_policies(issuer) + security_policy(
        "preview-hosts-jwt", {"jwt": {"providers": [provider(issuer)], "optional": True}},
        targets=[route_target("preview-hosts")], namespace="platform")
    async with running_gateway(tmp_path, preview_routes(access_mode="owner"), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig, policies_yaml=policies) as gw, \
            aiohttp.ClientSession() as session:
        _, created = await api(gw, "POST", "/gateway/v1/previews", alice, create_body("box-1", port))
        host = host_of(created)
        sockets = {}
        for who, token in (("alice", alice), ("bob", bob)):
            sockets[who] = await session.ws_connect(url(gw, "/ws"), headers={"Host": host, "Authorization": f"Bearer {token}"})
            await sockets[who].send_str(who)
            assert (await sockets[who].receive(timeout=5)).data == who
        kube = await KubeClient.connect(str(world.api.kubeconfig))
        try:
            await kube.merge_patch(SANDBOX_CLAIM, "agents", "box-1", {"metadata": {"annotations": {"sandgate.dev/shared-with": None}}})
        finally:
            await kube.close()
        started = monotonic()
        closed = await sockets["bob"].receive(timeout=3)
        took = monotonic() - started
        await sockets["alice"].send_str("still here")
        alice_still = (await sockets["alice"].receive(timeout=5)).data
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1001 and took < 3.0
    assert alice_still == "still here"


async def test_a_preview_never_reaches_a_sandbox_recreated_under_its_name(tmp_path, world, issuer):
    """alice's sandbox goes (its preview left behind: garbage collection pending, or orphaned)
    and bob gets a sandbox of the same name: alice's preview URL reaches nothing of bob's, bob
    does not see it, and the reaper counts it as gone with its sandbox."""
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice, bob = token_for(issuer), token_for(issuer, "bob@example.com")
    async with gateway(tmp_path, world, issuer, timing=FAST_REAPER) as gw:
        _, created = await api(gw, "POST", "/gateway/v1/previews", alice, create_body("box-1", port))
        host = host_of(created)
        assert (await via_host(gw, host))[0] == 200
        old_uid = gw.cluster.registry.find("agents", "box-1").uid
        world.api.delete(SANDBOX_API, "Sandbox", "agents", "box-1", propagation="Orphan")
        world.api.delete(CLAIM_API, "SandboxClaim", "agents", "box-1", propagation="Orphan")
        await world.add("agents", "box-1", owner="bob@example.com")

        async def replaced():
            info = gw.cluster.registry.find("agents", "box-1")
            return info is not None and info.uid != old_uid
        assert await wait_for(replaced, timeout=5)
        bobs_before = len([r for r in world.received if r[0] == "agents/box-1"])
        status, _, _ = await via_host(gw, host)
        listed = await api(gw, "GET", "/gateway/v1/previews?sandbox=box-1", bob)

        async def reaped():
            return gw.cluster.previews.table.by_token(created["token"]) is None
        assert await wait_for(reaped, timeout=5)
    assert status == 404
    assert len([r for r in world.received if r[0] == "agents/box-1"]) == bobs_before
    assert listed[0] == 200 and created["token"] not in json.dumps(listed[1])
