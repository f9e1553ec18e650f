"""Header-routed sandbox access and the port proxy (SPEC §4.1, §4.3), against the Kubernetes API
double and real apps standing in for sandbox pods."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.support.fixtures import issuer, world  # noqa: F401 - fixtures
from tests.support.harness import access_records, running_gateway, url
from tests.support.issuer import claims
from tests.support.policy_harness import provider, readiness, route_target, security_policy, wait_for, wait_ready
from tests.support.sandboxes import SANDBOX_API, ready_status, router_yaml
from gateway.server.handler import Settings

TOKEN = "s3cret-router-token"
LOOPBACK = Settings(allow_loopback_sandboxes=True)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "router-token"
    path.write_text(TOKEN + "\n")
    return path


async def request(running, path="/", *, method="GET", headers=None, token=TOKEN, data=None):
    out = {"Authorization": f"Bearer {token}"} if token else {}
    out.update(headers or {})
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url(running, path), headers=out, data=data) as response:
            body = await response.read()
            parsed = json.loads(body) if response.content_type == "application/json" and body else body
            return response.status, response.headers, parsed


def sandbox(name, port=None, namespace=None, **extra):
    headers = {"X-Sandbox-ID": name}
    if port is not None:
        headers["X-Sandbox-Port"] = str(port)
    if namespace is not None:
        headers["X-Sandbox-Namespace"] = namespace
    headers.update(extra)
    return headers


# --- header-routed access with the compatibility router token ---------------------------------


async def test_post_with_sandbox_headers_reaches_that_sandbox_without_routing_headers_or_token(tmp_path, world, token_file):
    _, port = await world.add("agents", "box-1")
    await world.add("agents", "box-2")
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        status, headers, body = await request(
            gw, "/chat?x=1", method="POST", data=b'{"q": "hi"}',
            headers=sandbox("box-1", port, "agents", **{"Content-Type": "application/json", "X-Sandbox-Extra": "y"}),
        )
    assert status == 200, body
    assert body["backend"] == "agents/box-1"
    assert body["method"] == "POST" and body["path"] == "/chat?x=1" and body["body_length"] == 11
    sent = {k.lower() for k, _ in body["headers"]}
    assert not {h for h in sent if h.startswith("x-sandbox-")}, sent
    assert "authorization" not in sent
    assert "x-request-id" in {k.lower() for k in headers}


async def test_default_namespace_and_port_come_from_the_router(tmp_path, world, token_file, aiohttp_server):
    _, port = await world.add("agents", "box-1")
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file), default_port=port), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        status, _, body = await request(gw, "/", headers=sandbox("box-1"))
    assert status == 200 and body["backend"] == "agents/box-1"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Sandbox-ID": "evil.com"},
        {"X-Sandbox-ID": "a@b"},
        {"X-Sandbox-ID": ".."},
        {"X-Sandbox-ID": "Box-1"},
        {"X-Sandbox-ID": "a" * 64},
        {"X-Sandbox-ID": "-box"},
        {"X-Sandbox-ID": "box-"},
        {"X-Sandbox-ID": ""},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Port": "+8080"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Port": "1_000"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Port": "0"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Port": "65536"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Port": ""},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Port": "8 0"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Port": "８０"},  # full-width digits
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Namespace": "kube-system"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Namespace": "Agents"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Namespace": "../agents"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Timeout": "-1"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Timeout": "inf"},
        {"X-Sandbox-ID": "box-1", "X-Sandbox-Timeout": "0"},
    ],
    ids=lambda h: repr(h)[:60],
)
async def test_hostile_sandbox_headers_get_400_and_reach_nothing(tmp_path, world, token_file, headers):
    await world.add("agents", "box-1")
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        status, _, body = await request(gw, "/", headers=headers)
    assert status == 400, body
    assert body["error"] == "bad_request" and body["message"] and body["request_id"]
    assert world.received == []


async def test_raw_hostile_headers_newline_and_repeats_get_400_and_bad_token_bytes_401(tmp_path, world, token_file):
    """What an HTTP library would not send: a repeated X-Sandbox-* header, a name with a
    trailing newline smuggled as an obs-fold, a NUL; and a token that is not UTF-8 (401)."""
    from tests.support.rawhttp import send

    _, port = await world.add("agents", "box-1")
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        auth = f"Authorization: Bearer {TOKEN}\r\n"
        cases = [
            "X-Sandbox-ID: box-1\r\nX-Sandbox-ID: box-2\r\n",
            f"X-Sandbox-ID: box-1\r\nX-Sandbox-Port: {port}\r\nX-Sandbox-Port: {port}\r\n",
            "X-Sandbox-ID: box-1\r\nX-Sandbox-Namespace: agents\r\nX-Sandbox-Namespace: agents\r\n",
            "X-Sandbox-ID: box-1%0a\r\n",
            "X-Sandbox-ID: box-1\\n\r\n",
            "X-Sandbox-ID: box-1\x00\r\n",
        ]
        for extra in cases:
            raw = f"GET / HTTP/1.1\r\nHost: x\r\n{auth}{extra}Connection: close\r\n\r\n".encode()
            [response] = await send(gw, raw)
            assert response.status == 400, (extra, response)
        # a router token with bytes that are not UTF-8
        raw = (f"GET / HTTP/1.1\r\nHost: x\r\nX-Sandbox-ID: box-1\r\nX-Sandbox-Port: {port}\r\n"
               f"Connection: close\r\nAuthorization: Bearer {TOKEN}").encode() + b"\xff\r\n\r\n"
        [response] = await send(gw, raw)
        assert response.status == 401, response
    assert world.received == []


async def test_router_token_is_required_and_compared_exactly(tmp_path, world, token_file):
    _, port = await world.add("agents", "box-1")
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        missing = await request(gw, "/", headers=sandbox("box-1", port), token=None)
        wrong = await request(gw, "/", headers=sandbox("box-1", port), token=TOKEN + "x")
        prefix = await request(gw, "/", headers=sandbox("box-1", port), token=TOKEN[:-1])
        ok = await request(gw, "/", headers=sandbox("box-1", port))
        # a rotated Secret is picked up without a restart
        token_file.write_text("rotated-token")
        await asyncio.sleep(1.2)
        old = await request(gw, "/", headers=sandbox("box-1", port))
        new = await request(gw, "/", headers=sandbox("box-1", port), token="rotated-token")
    assert missing[0] == 401 and missing[1]["WWW-Authenticate"] == 'Bearer realm="sandgate"'
    assert wrong[0] == 401 and 'error="invalid_token"' in wrong[1]["WWW-Authenticate"]
    assert prefix[0] == 401
    assert ok[0] == 200 and old[0] == 401 and new[0] == 200
    assert len(world.received) == 2


async def test_unknown_sandbox_is_404_and_not_ready_is_503(tmp_path, world, token_file):
    _, port = await world.add("agents", "starting", ready=False)
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        unknown = await request(gw, "/", headers=sandbox("nope", port))
        starting = await request(gw, "/", headers=sandbox("starting", port))
        world.api.set_status(SANDBOX_API, "Sandbox", "agents", "starting", ready_status(world_ip(world, "starting")))
        assert await wait_for(lambda: _ok(gw, "starting", port), timeout=5)
    assert unknown[0] == 404 and unknown[2]["error"] == "sandbox_not_found"
    assert starting[0] == 503 and starting[2]["error"] == "sandbox_not_ready"
    assert "not ready" in starting[2]["message"].lower()


def world_ip(world, name, namespace="agents"):
    return world.apps[(namespace, name)].host


async def _ok(gw, name, port) -> bool:
    status, _, _ = await request(gw, "/", headers=sandbox(name, port))
    return status == 200


async def test_sandbox_without_service_is_reached_by_pod_ip_and_metadata_addresses_never(tmp_path, world, token_file):
    """A warm-pool sandbox has pod IPs and no Service; a status naming the cloud metadata
    address (or, outside local runs, loopback) is never dialled."""
    _, port = await world.add("agents", "warm")
    world.api.create({
        "apiVersion": SANDBOX_API, "kind": "Sandbox", "metadata": {"name": "sneaky", "namespace": "agents"},
        "spec": {"podTemplate": {"metadata": {}, "spec": {"containers": [{"name": "a", "image": "x"}]}}},
    })
    world.api.set_status(SANDBOX_API, "Sandbox", "agents", "sneaky", ready_status("169.254.169.254"))
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        warm = await request(gw, "/", headers=sandbox("warm", port))
        sneaky = await request(gw, "/", headers=sandbox("sneaky", 80))
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), kubeconfig=world.api.kubeconfig) as gw:
        loopback = await request(gw, "/", headers=sandbox("warm", port))
    assert warm[0] == 200
    assert sneaky[0] == 503 and loopback[0] == 503
    assert [r[0] for r in world.received] == ["agents/warm"]


async def test_sandbox_timeout_header_lowers_but_never_raises_the_router_timeout(tmp_path, world, token_file):
    _, port = await world.add("agents", "slow")
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file), timeout="1s"), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        started = time.monotonic()
        lowered = await request(gw, "/", headers=sandbox("slow", port, **{"X-Sandbox-Timeout": "0.2", "X-Echo-Delay": "0.6"}))
        lowered_took = time.monotonic() - started
        within = await request(gw, "/", headers=sandbox("slow", port, **{"X-Sandbox-Timeout": "0.9", "X-Echo-Delay": "0.3"}))
        started = time.monotonic()
        raised = await request(gw, "/", headers=sandbox("slow", port, **{"X-Sandbox-Timeout": "30", "X-Echo-Delay": "2"}))
        raised_took = time.monotonic() - started
    assert lowered[0] == 504 and lowered_took < 0.55
    assert within[0] == 200
    assert raised[0] == 504 and raised_took < 1.8


async def test_websocket_through_header_routing_closes_when_the_sandbox_is_deleted(tmp_path, world, token_file):
    _, port = await world.add("agents", "box-1")
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {TOKEN}", **sandbox("box-1", port)}
            async with session.ws_connect(url(gw, "/ws"), headers=headers, protocols=("chat.v1",)) as ws:
                hello = json.loads((await ws.receive()).data)
                assert hello["backend"] == "agents/box-1" and ws.protocol == "chat.v1"
                await ws.send_str("ping-1")
                assert (await ws.receive()).data == "ping-1"
                world.api.delete(SANDBOX_API, "Sandbox", "agents", "box-1")
                closing = await asyncio.wait_for(ws.receive(), 5)
    assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
    assert ws.close_code == 1001
    assert "deleted" in (closing.extra or "")


async def test_port_proxy_strips_the_prefix_and_carries_websockets(tmp_path, world, token_file):
    _, port = await world.add("agents", "box-1")
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        base = f"/gateway/v1/sandboxes/agents/box-1/ports/{port}"
        deep = await request(gw, f"{base}/app/page%2Fx?q=1")
        root = await request(gw, base)
        bad_port = await request(gw, "/gateway/v1/sandboxes/agents/box-1/ports/99999/x")
        bad_name = await request(gw, f"/gateway/v1/sandboxes/agents/Box/ports/{port}/")
        other_ns = await request(gw, f"/gateway/v1/sandboxes/kube-system/box-1/ports/{port}/")
        unknown = await request(gw, "/gateway/v1/sandboxes/agents/box-1/files")
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url(gw, f"{base}/ws"), headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
                hello = json.loads((await ws.receive()).data)
                await ws.send_str("over the port proxy")
                echoed = (await ws.receive()).data
    assert deep[0] == 200 and deep[2]["path"] == "/app/page%2Fx?q=1"
    assert root[0] == 200 and root[2]["path"] == "/"
    assert bad_port[0] == 400 and bad_name[0] == 400 and other_ns[0] == 400
    assert unknown[0] == 404
    assert hello["backend"] == "agents/box-1" and echoed == "over the port proxy"


async def test_dns_resolution_dials_the_service_name_and_502s_when_it_does_not_resolve(tmp_path, world, token_file):
    _, port = await world.add("agents", "box-1")
    ip = world_ip(world, "box-1")
    overrides = {f"box-1.agents.svc.cluster.local:{port}": (ip, port)}
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file), resolution="DNS"),
                               overrides=overrides, settings=LOOPBACK) as gw:
        found = await request(gw, "/", headers=sandbox("box-1", port))
        missing = await request(gw, "/", headers=sandbox("box-9", port))
    assert found[0] == 200 and found[2]["backend"] == "agents/box-1"
    assert missing[0] == 502


async def test_cached_sandboxes_keep_serving_while_the_api_is_away_and_the_watch_resumes(tmp_path, world, token_file):
    _, port = await world.add("agents", "box-1")
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        assert (await request(gw, "/", headers=sandbox("box-1", port)))[0] == 200
        await world.api.stop()
        during = await request(gw, "/", headers=sandbox("box-1", port))
        _, port2 = await world.add("agents", "box-2")  # written while the gateway cannot see it
        still_unknown = await request(gw, "/", headers=sandbox("box-2", port2))
        await world.api.start()
        assert await wait_for(lambda: _ok(gw, "box-2", port2), timeout=15)
    assert during[0] == 200
    assert still_unknown[0] == 404


# --- identity: owner, shared, admin, stranger --------------------------------------------------


def jwt_policies(issuer, *, admin_groups=("platform-admins",)) -> str:
    security = security_policy("sandbox-jwt", {"jwt": {"providers": [provider(issuer)]}},
                               targets=[route_target("sandboxes")], namespace="platform")
    sandbox_policy = {
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPolicy",
        "metadata": {"name": "who", "namespace": "platform"},
        "spec": {"targetRefs": [route_target("sandboxes")], "owner": {"annotation": "sandgate.dev/owner"},
                 "adminGroups": list(admin_groups)},
    }
    import yaml

    return security + "---\n" + yaml.safe_dump(sandbox_policy, sort_keys=False)


async def test_owner_shared_admin_may_reach_and_a_stranger_sees_404(tmp_path, world, issuer):
    _, port = await world.add("agents", "alice-box", owner="alice@example.com",
                              shared_with="bob@example.com, group:reviewers")
    _, unowned_port = await world.add("agents", "direct-box", owner="alice@example.com", via_claim=False)
    async with running_gateway(tmp_path, router_yaml(), settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                               policies_yaml=jwt_policies(issuer)) as gw:
        async def as_user(sub, groups=(), name="alice-box", p=port):
            token = issuer.mint(claims(sub=sub, groups=list(groups)))
            return await request(gw, "/", headers=sandbox(name, p), token=token)

        owner = await as_user("alice@example.com")
        owner_direct = await as_user("alice@example.com", name="direct-box", p=unowned_port)
        shared_user = await as_user("bob@example.com")
        shared_group = await as_user("carol@example.com", ["reviewers"])
        admin = await as_user("root@example.com", ["platform-admins"])
        stranger = await as_user("mallory@example.com", ["users"])
        nonexistent = await as_user("mallory@example.com", name="ghost")
        anonymous = await request(gw, "/", headers=sandbox("alice-box", port), token=None)
    for result in (owner, owner_direct, shared_user, shared_group, admin):
        assert result[0] == 200, result
    assert stranger[0] == 404 and nonexistent[0] == 404
    # the refusal for a stranger is indistinguishable from a sandbox that does not exist
    assert stranger[2]["error"] == nonexistent[2]["error"] == "sandbox_not_found"
    assert stranger[2]["message"].replace("alice-box", "X") == nonexistent[2]["message"].replace("ghost", "X")
    assert anonymous[0] == 401
    assert [r[0] for r in world.received].count("agents/alice-box") == 4


async def test_a_router_without_authentication_is_refused_by_check_and_serve(tmp_path):
    from gateway.cli import main

    routes = tmp_path / "routes.yaml"
    routes.write_text(router_yaml())
    (tmp_path / "policies").mkdir()
    code = main(["check", "--routes", str(routes), "--policies", str(tmp_path / "policies")])
    assert code == 1
    missing = tmp_path / "no-such-token"
    routes.write_text(router_yaml(token_file=str(missing)))
    assert main(["check", "--routes", str(routes), "--policies", str(tmp_path / "policies")]) == 1
    routes.write_text(router_yaml(allow_unauthenticated=True, resolution="DNS"))
    assert main(["check", "--routes", str(routes), "--policies", str(tmp_path / "policies")]) == 0


async def test_check_names_the_router_and_the_missing_token_file(tmp_path, capsys):
    from gateway.cli import main

    routes = tmp_path / "routes.yaml"
    (tmp_path / "policies").mkdir()
    routes.write_text(router_yaml())
    main(["check", "--routes", str(routes), "--policies", str(tmp_path / "policies")])
    out = capsys.readouterr().out
    assert "SandboxRouter platform/sandboxes" in out and "no authentication" in out
    routes.write_text(router_yaml(token_file=str(tmp_path / "absent-token")))
    main(["check", "--routes", str(routes), "--policies", str(tmp_path / "policies")])
    out = capsys.readouterr().out
    assert str(tmp_path / "absent-token") in out


async def test_without_kubernetes_sandboxes_answer_503_and_readiness_says_why(tmp_path, token_file):
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=tmp_path / "no-such-kubeconfig") as gw:
        result = await request(gw, "/", headers=sandbox("box-1", 8080))
        status, details = await readiness(gw)
    assert result[0] == 503 and result[2]["error"] == "kubernetes_unavailable"
    assert status == 503 and details["kubernetes"] == "unavailable"


async def test_readiness_waits_for_the_sandbox_watches(tmp_path, world, token_file):
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), settings=LOOPBACK,
                               kubeconfig=world.api.kubeconfig) as gw:
        assert await wait_ready(gw)
        assert (await readiness(gw))[1]["kubernetes"] == "synced"
        await world.api.stop()

        async def unready():
            return (await readiness(gw))[0] == 503

        assert await wait_for(unready, timeout=10)
        await world.api.start()
        assert await wait_ready(gw, timeout=15)


async def test_a_sandbox_refusal_is_the_decision_of_the_access_log_line_and_the_audit_record(tmp_path, world, issuer):
    """One decision, one truth: the SecurityPolicy lets the caller in, the SandboxPolicy refuses
    (not their sandbox): the access log line says deny with the reason the audit store holds."""
    _, port = await world.add("agents", "carol-box", owner="carol@example.com")
    async with running_gateway(tmp_path, router_yaml(), settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                               policies_yaml=jwt_policies(issuer)) as gw:
        status, headers, body = await request(gw, "/", headers=sandbox("carol-box", port),
                                              token=issuer.mint(claims(sub="dave@example.com")))
        own = await request(gw, "/", headers=sandbox("carol-box", port), token=issuer.mint(claims(sub="carol@example.com")))
        request_id = headers["X-Request-Id"]

        async def stored():
            return await gw.store.count_audit(request_id=request_id, decision="deny") > 0
        assert await wait_for(stored, timeout=5)
        records = await gw.store.list_audit(request_id=request_id)
        lines = access_records(gw)
    assert status == 404 and body["error"] == "sandbox_not_found" and own[0] == 200
    line = next(r for r in lines if r["request_id"] == request_id)
    assert line["status"] == 404
    assert line["decision"] == "deny" and line["reasons"] == ["sandbox-not-found"], line
    assert line["principal"] == "https://issuer.example.test#dave@example.com"  # as policy decisions name it
    deny = next(r for r in records if r.decision == "deny")
    assert line["audit_id"] == deny.id and list(deny.reasons) == line["reasons"]
    allowed_line = next(r for r in lines if r["status"] == 200)
    assert allowed_line["decision"] == "allow"
