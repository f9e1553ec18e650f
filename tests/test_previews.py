"""Preview URLs (SPEC §5) against the Kubernetes API double and real sandbox apps: the API, the
objects it creates, serving the capability hosts, isolation, lifetime and the reaper."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.support.fixtures import issuer, world  # noqa: F401 - fixtures
from tests.support.harness import access_records, running_gateway, url
from tests.support.policy_harness import metric_value, wait_for
from tests.support.previews import LOOPBACK, ZONE, api, host_of, preview_policies, preview_routes, token_for, via_host
from tests.support.previews import preview_gateway as gateway
from tests.support.sandboxes import SANDBOX_API, pod_selector

FAST = {"reap_interval": 0.2, "touch_interval": 0.2}


async def test_create_makes_service_and_httproute_and_the_first_request_succeeds(tmp_path, world, issuer):
    ip, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice = token_for(issuer)
    async with gateway(tmp_path, world, issuer) as gw:
        status, created = await api(gw, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port})
        host = host_of(created)
        first = await via_host(gw, host, "/hello?x=1")
        assert status == 201, created
        assert set(created) == {"token", "url", "expires_at", "max_until"}
        token = created["token"]
        assert len(token) == 26 and token == token.lower() and host == f"{token}-preview.{ZONE}"
        assert first[0] == 200 and first[2]["backend"] == "agents/box-1" and first[2]["path"] == "/hello?x=1"

        sandbox = world.api.get(SANDBOX_API, "Sandbox", "agents", "box-1")
        service = world.api.get("v1", "Service", "agents", f"preview-{token}")
        route = world.api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "agents", f"preview-{token}")
        for obj in (service, route):
            meta = obj["metadata"]
            assert meta["labels"] == {"sandgate.dev/preview": "true", "sandgate.dev/sandbox": "box-1"}
            assert {"sandgate.dev/owner", "sandgate.dev/port", "sandgate.dev/created-at", "sandgate.dev/expires-at",
                    "sandgate.dev/max-until"} <= meta["annotations"].keys()
            assert meta["annotations"]["sandgate.dev/port"] == str(port)
            [owner] = meta["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"]) == ("Sandbox", "box-1", sandbox["metadata"]["uid"])
        assert service["spec"]["selector"] == dict([pod_selector("box-1").split("=")])
        assert service["spec"]["ports"][0]["port"] == port
        assert route["spec"]["hostnames"] == [host]
        assert route["spec"]["parentRefs"][0]["name"] == "gw"
        assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == f"preview-{token}"

        # WebSocket through the preview host
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url(gw, "/ws"), headers={"Host": host}) as ws:
                hello = json.loads((await ws.receive()).data)
                await ws.send_str("through the preview")
                echoed = (await ws.receive()).data
        assert hello["backend"] == "agents/box-1" and echoed == "through the preview"
        # the token is a capability: it never appears whole in the access log
        log = json.dumps(access_records(gw))
        assert token not in log


async def test_refusals_with_reasons(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    await world.add("agents", "starting", owner="alice@example.com", ready=False)
    await world.add("agents", "bobs", owner="bob@example.com")
    alice = token_for(issuer)
    async with gateway(tmp_path, world, issuer, max_per_sandbox=1, ports=(1024, 65535)) as gw:
        def create(body, token=alice):
            return api(gw, "POST", "/gateway/v1/previews", token, body)

        no_token = await create({"namespace": "agents", "sandbox": "box-1", "port": port}, token=None)
        low_port = await create({"namespace": "agents", "sandbox": "box-1", "port": 80})
        bad_body = await create({"namespace": "agents", "sandbox": "box-1", "port": "80"})
        bad_name = await create({"namespace": "agents", "sandbox": "Box!", "port": port})
        unknown = await create({"namespace": "agents", "sandbox": "ghost", "port": port})
        not_mine = await create({"namespace": "agents", "sandbox": "bobs", "port": port})
        other_ns = await create({"namespace": "kube-system", "sandbox": "box-1", "port": port})
        not_ready = await create({"namespace": "agents", "sandbox": "starting", "port": port})
        first = await create({"namespace": "agents", "sandbox": "box-1", "port": port})
        over_cap = await create({"namespace": "agents", "sandbox": "box-1", "port": port})
    assert no_token[0] == 401
    assert low_port[0] == 400 and low_port[1]["error"] == "port_not_allowed"
    assert bad_body[0] == 400 and bad_name[0] == 400
    assert unknown[0] == not_mine[0] == other_ns[0] == 404
    assert unknown[1]["error"] == not_mine[1]["error"] == "sandbox_not_found"
    assert not_ready[0] == 409 and not_ready[1]["error"] == "sandbox_not_ready"
    assert first[0] == 201
    assert over_cap[0] == 429 and over_cap[1]["error"] == "preview_limit"


async def test_list_get_keepalive_delete_and_a_deleted_or_guessed_host_is_404(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    _, bob_port = await world.add("agents", "bobs", owner="bob@example.com")
    alice, bob = token_for(issuer), token_for(issuer, "bob@example.com")
    async with gateway(tmp_path, world, issuer) as gw:
        _, created = await api(gw, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port})
        _, bobs = await api(gw, "POST", "/gateway/v1/previews", bob, {"namespace": "agents", "sandbox": "bobs", "port": bob_port})
        token = created["token"]
        listed = await api(gw, "GET", "/gateway/v1/previews", alice)
        filtered = await api(gw, "GET", "/gateway/v1/previews?sandbox=bobs", alice)
        got = await api(gw, "GET", f"/gateway/v1/previews/{token}", alice)
        stranger = await api(gw, "GET", f"/gateway/v1/previews/{token}", bob)
        kept = await api(gw, "POST", f"/gateway/v1/previews/{token}/keepalive", alice)
        guessed = await via_host(gw, f"{'a' * 26}-preview.{ZONE}")
        not_a_preview = await via_host(gw, f"www.{ZONE}")
        assert (await via_host(gw, host_of(created)))[0] == 200
        deleted = await api(gw, "DELETE", f"/gateway/v1/previews/{token}", alice)
        after = await via_host(gw, host_of(created))
        bob_still = await via_host(gw, host_of(bobs))
    assert [p["token"] for p in listed[1]["previews"]] == [token]
    assert filtered[1]["previews"] == []
    assert got[0] == 200 and got[1]["sandbox"] == "box-1" and got[1]["port"] == port
    assert stranger[0] == 404
    assert kept[0] == 200 and kept[1]["expires_at"] >= created["expires_at"]
    assert guessed[0] == 404 and not_a_preview[0] == 404
    assert deleted[0] == 204 and after[0] == 404
    assert bob_still[0] == 200
    assert world.api.list("v1", "Service", "agents") == [s for s in world.api.list("v1", "Service", "agents")
                                                          if s["metadata"]["name"] == f"preview-{bobs['token']}"]


async def test_guessed_hosts_cannot_flood_the_api_server(tmp_path, world, issuer):
    await world.add("agents", "box-1", owner="alice@example.com")
    async with gateway(tmp_path, world, issuer) as gw:
        before = len(world.api.requests)
        guess = f"{'b' * 26}-preview.{ZONE}"
        for _ in range(50):
            assert (await via_host(gw, guess))[0] == 404
        for i in range(20):  # not even shaped like a token: never looked up
            assert (await via_host(gw, f"not-a-token-{i}-preview.{ZONE}"))[0] == 404
    lookups = [r for r in world.api.requests[before:] if r[0] == "GET" and "preview-" in r[1]]
    assert len(lookups) == 1


async def test_httproute_failure_rolls_the_service_back(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    async with gateway(tmp_path, world, issuer) as gw:
        world.api.fail_next("POST", "httproutes", status=500)
        status, body = await api(gw, "POST", "/gateway/v1/previews", token_for(issuer), {"namespace": "agents", "sandbox": "box-1", "port": port})
    assert status == 502 and body["error"] == "preview_not_created"
    assert world.api.list("v1", "Service", "agents") == []
    assert world.api.list("gateway.networking.k8s.io/v1", "HTTPRoute", "agents") == []


async def test_previews_never_see_platform_credentials_and_set_cookies_for_their_host_only(tmp_path, world, issuer):
    from aiohttp import web

    seen = []

    async def app_handler(request):
        seen.append(dict(request.headers))
        response = web.json_response({"ok": True})
        response.headers.add("Set-Cookie", f"session=1; Domain={ZONE}; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "theme=dark; Path=/")
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", app_handler)
    _, port = await world.add("agents", "box-1", owner="alice@example.com", app=app)
    alice = token_for(issuer)
    async with gateway(tmp_path, world, issuer) as gw:
        _, created = await api(gw, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port})
        status, headers, _ = await via_host(gw, host_of(created), headers={
            "Authorization": f"Bearer {alice}", "Cookie": "theme=dark; own=1", "X-Sandbox-ID": "other",
        })
    assert status == 200
    forwarded = {k.lower(): v for k, v in seen[0].items()}
    assert "authorization" not in forwarded and "x-sandbox-id" not in forwarded
    assert forwarded["cookie"] == "theme=dark; own=1"
    cookies = headers.getall("Set-Cookie")
    assert all("domain" not in c.lower() for c in cookies), cookies
    assert len(cookies) == 2


async def test_idle_previews_expire_and_are_reaped_and_traffic_extends_them(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice = token_for(issuer)
    body = {"namespace": "agents", "sandbox": "box-1", "port": port}
    async with gateway(tmp_path, world, issuer, routes=preview_routes(idle_ttl="1500ms"), timing=FAST) as gw:
        _, busy = await api(gw, "POST", "/gateway/v1/previews", alice, body)
        _, idle = await api(gw, "POST", "/gateway/v1/previews", alice, body)
        for _ in range(12):  # 2.4 s of traffic on one of them
            assert (await via_host(gw, host_of(busy)))[0] == 200
            await asyncio.sleep(0.2)
        idle_after = await via_host(gw, host_of(idle))
        busy_after = await via_host(gw, host_of(busy))

        async def reaped():
            return await metric_value(gw, "sandgate_previews_reaped_total", reason="idle") >= 1

        assert await wait_for(reaped, timeout=5)
        routes = world.api.list("gateway.networking.k8s.io/v1", "HTTPRoute", "agents")
    assert idle_after[0] == 404 and busy_after[0] == 200
    assert [r["metadata"]["name"] for r in routes] == [f"preview-{busy['token']}"]
    patches = [r for r in world.api.requests if r[0] == "PATCH"]
    assert 1 <= len(patches) <= 12  # debounced: far fewer writes than requests


async def test_deleting_the_sandbox_removes_its_previews(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    async with gateway(tmp_path, world, issuer, timing=FAST) as gw:
        _, created = await api(gw, "POST", "/gateway/v1/previews", token_for(issuer), {"namespace": "agents", "sandbox": "box-1", "port": port})
        assert (await via_host(gw, host_of(created)))[0] == 200
        world.api.delete(SANDBOX_API, "Sandbox", "agents", "box-1")

        async def gone():
            return (await via_host(gw, host_of(created)))[0] == 404

        assert await wait_for(gone, timeout=5)
        assert world.api.list("v1", "Service", "agents") == []


async def test_two_replicas_create_on_one_serve_on_the_other_and_reap_once(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice = token_for(issuer)
    routes = preview_routes(idle_ttl="1s")
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    async with gateway(tmp_path / "r1", world, issuer, routes=routes, timing={"reap_interval": 3600}) as one, \
            gateway(tmp_path / "r2", world, issuer, routes=routes, timing={"reap_interval": 3600}) as two:
        created = [
            (await api(one, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port}))[1]
            for _ in range(5)
        ]
        on_two = [await via_host(two, host_of(c)) for c in created]
        assert [r[0] for r in on_two] == [200] * 5
        await asyncio.sleep(1.2)
        first, second = await asyncio.gather(one.cluster.previews.reap_once(), two.cluster.previews.reap_once())
    assert sum(first.values()) + sum(second.values()) == 5
    assert world.api.list("gateway.networking.k8s.io/v1", "HTTPRoute", "agents") == []


async def test_the_hard_cap_ends_a_busy_preview(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice = token_for(issuer)
    routes = preview_routes(idle_ttl="10m", max_lifetime="1s")
    async with gateway(tmp_path, world, issuer, routes=routes, timing=FAST) as gw:
        _, created = await api(gw, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port})
        assert (await via_host(gw, host_of(created)))[0] == 200
        kept = await api(gw, "POST", f"/gateway/v1/previews/{created['token']}/keepalive", alice)
        assert kept[1]["expires_at"] <= created["max_until"]  # keepalive never passes the cap

        async def reaped():
            return await metric_value(gw, "sandgate_previews_reaped_total", reason="max-lifetime") == 1

        assert await wait_for(reaped, timeout=5)
        assert (await via_host(gw, host_of(created)))[0] == 404


async def test_owner_access_mode_needs_the_owner_signed_in(tmp_path, world, issuer):
    from tests.support.policy_harness import route_target, security_policy, provider

    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice, bob = token_for(issuer), token_for(issuer, "bob@example.com")
    policies = preview_policies(issuer) + security_policy(
        "preview-hosts-jwt", {"jwt": {"providers": [provider(issuer)], "optional": True}},
        targets=[route_target("preview-hosts")], namespace="platform")
    async with start_with(tmp_path, world, preview_routes(access_mode="owner"), policies) as gw:
        _, created = await api(gw, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port})
        host = host_of(created)
        anonymous = await via_host(gw, host)
        stranger = await via_host(gw, host, headers={"Authorization": f"Bearer {bob}"})
        owner = await via_host(gw, host, headers={"Authorization": f"Bearer {alice}"})
    assert anonymous[0] == 401 and stranger[0] == 404 and owner[0] == 200


def start_with(tmp_path, world, routes, policies):
    return running_gateway(tmp_path, routes, settings=LOOPBACK, kubeconfig=world.api.kubeconfig, policies_yaml=policies)


async def test_check_refuses_a_preview_zone_without_a_sandbox_router(tmp_path, capsys):
    from gateway.cli import main

    text = preview_routes()
    without_router = "\n---\n".join(
        d for d in text.split("\n---\n") if "kind: SandboxRouter" not in d and "name: sandboxes, namespace" not in d
    )
    (tmp_path / "routes.yaml").write_text(without_router)
    (tmp_path / "policies").mkdir()
    assert main(["check", "--routes", str(tmp_path / "routes.yaml"), "--policies", str(tmp_path / "policies")]) == 1
    assert "PreviewZone platform/previews" in capsys.readouterr().out
