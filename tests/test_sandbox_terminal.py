"""The sandbox terminal (SPEC §4.2): a browser-style WebSocket client, JSON frames, a real shell
in a pty behind the Kubernetes API double's pod exec."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from gateway.sandbox.terminal import TerminalSettings
from gateway.server.handler import Settings
from tests.support.harness import running_gateway, url
from tests.support.issuer import ISSUER, Issuer, claims
from tests.support.kubeapi import running_kube_api
from tests.support.policy_harness import provider, route_target, security_policy, wait_for
from gateway.sandbox.registry import POD_NAME_ANNOTATION
from tests.support.sandboxes import SANDBOX_API, SandboxWorld, pod_object, pod_selector, ready_status, router_yaml, sandbox_object

TOKEN = "terminal-router-token"
PATH = "/gateway/v1/sandboxes/agents/box-1/terminal"


@pytest.fixture
async def terminal_gateway(tmp_path, aiohttp_server):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    async with running_kube_api(tmp_path) as api:
        world = SandboxWorld(api, aiohttp_server)
        await world.add("agents", "box-1", with_pod=True)
        async with running_gateway(
            tmp_path, router_yaml(token_file=str(token)), settings=Settings(allow_loopback_sandboxes=True),
            kubeconfig=api.kubeconfig, terminal=TerminalSettings(reconnect_window=3.0, idle_timeout=60.0),
        ) as gw:
            gw.world = world
            yield gw


def connect(session, gw, path=PATH, token=TOKEN):
    return session.ws_connect(url(gw, path), headers={"Authorization": f"Bearer {token}"})


async def read_until(ws, needle: str, timeout: float = 10.0) -> str:
    """Output frames joined until `needle` shows up; other frame types are returned too."""
    seen = ""
    async with asyncio.timeout(timeout):
        while needle not in seen:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            frame = json.loads(msg.data)
            if frame["type"] == "output":
                seen += frame["data"]
            else:
                seen += json.dumps(frame)
    return seen


async def run(ws, command: str, marker: str) -> str:
    await ws.send_str(json.dumps({"type": "input", "data": f"{command}; echo {marker}-$((40+2))\n"}))
    return await read_until(ws, f"{marker}-42")


async def test_shell_input_output_resize_ping_and_exit_code(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            out = await run(ws, "echo hello-from-$((6*7))", "done")
            assert "hello-from-42" in out
            await ws.send_str(json.dumps({"type": "resize", "cols": 123, "rows": 45}))
            out = await run(ws, "stty size", "sized")
            assert "45 123" in out
            await ws.send_str(json.dumps({"type": "ping"}))
            assert '"pong"' in await read_until(ws, "pong")
            await ws.send_str("not json")
            assert "error" in await read_until(ws, '"error"')
            await ws.send_str(json.dumps({"type": "resize", "cols": -1, "rows": 10**9}))
            assert "error" in await read_until(ws, '"error"')
            for hostile in ({"type": "input", "data": 123}, {"type": ["input"]}, [1, 2], {"data": "ls\n"}):
                await ws.send_str(json.dumps(hostile))
                assert "error" in await read_until(ws, '"error"')
            # a lone surrogate (valid JSON, no UTF-8 form) reaches the shell as U+FFFD
            await ws.send_str('{"type": "input", "data": "echo lone-\\ud800-ok\\n"}')
            assert "lone-" in await read_until(ws, "-ok")
            await ws.send_bytes(b"\x00binary")
            assert "error" in await read_until(ws, '"error"')
            assert "alive" in await run(ws, "echo still-alive", "alive")
            await ws.send_str(json.dumps({"type": "input", "data": "exit 3\n"}))
            ending = await read_until(ws, '"exit"')
            assert json.loads(ending[ending.index("{"):])["code"] == 3
            closing = await ws.receive()
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_a_dropped_client_resumes_the_same_shell_within_the_window(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            await run(ws, "SECRET_WORD=swordfish-$$", "set")
            out = await run(ws, "echo pid=$$", "pid")
            pid = re.search(r"pid=(\d+)", out).group(1)  # the output, not the echoed command line
            # printed while nobody is connected: replayed on resume
            await ws.send_str(json.dumps({"type": "input", "data": "sleep 0.3; echo while-away\n"}))
        await asyncio.sleep(0.8)
        async with connect(session, gw) as ws:
            out = await run(ws, "echo word=$SECRET_WORD", "resumed")
            assert f"word=swordfish-{pid}" in out
            assert "while-away" in out
    assert await stored(gw, "terminal.opened") and await stored(gw, "terminal.resumed")


async def test_after_the_window_a_new_shell_starts(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            await run(ws, "GONE=yes", "set")
        assert await wait_for(lambda: _no_sessions(gw), timeout=8)
        async with connect(session, gw) as ws:
            out = await run(ws, "echo gone=[$GONE]", "fresh")
            assert "gone=[]" in out
    assert await stored(gw, "terminal.closed")


async def _no_sessions(gw) -> bool:
    return len(gw.gateway.sandboxes.terminals) == 0  # the shell of the dropped client ended


async def test_terminal_refuses_without_the_token_and_for_unknown_sandboxes(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        for path, token, status in [
            (PATH, "wrong", 401),
            ("/gateway/v1/sandboxes/agents/ghost/terminal", TOKEN, 404),
            ("/gateway/v1/sandboxes/other/box-1/terminal", TOKEN, 400),
        ]:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with connect(session, gw, path, token):
                    pass
            assert refused.value.status == status
        async with session.get(url(gw, PATH), headers={"Authorization": f"Bearer {TOKEN}"}) as plain:
            assert plain.status == 400


async def test_deleting_the_sandbox_ends_its_terminal(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            await run(ws, "true", "ready")
            gw.world.api.delete(SANDBOX_API, "Sandbox", "agents", "box-1")
            out = await read_until(ws, '"error"')
            assert "deleted" in out
            closing = await asyncio.wait_for(ws.receive(), 5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 1001


async def stored(gw, kind: str) -> bool:
    """The audit store holds an event of this kind (writes are batched: poll briefly)."""
    async def present():
        return await gw.store.count_audit(kind=kind) > 0

    return await wait_for(present, timeout=5)


async def test_the_pod_name_annotation_cannot_point_the_shell_at_another_sandboxs_pod(terminal_gateway):
    """`agents.x-k8s.io/pod-name` says which pod to exec into; a pod is only used when it is
    the Sandbox's (owned by its uid, or carrying its status.selector labels)."""
    gw = terminal_gateway
    api = gw.world.api
    hijack = sandbox_object("agents", "hijack", annotations={POD_NAME_ANNOTATION: "box-1"})  # box-1's pod
    api.create(hijack)
    api.set_status(SANDBOX_API, "Sandbox", "agents", "hijack", ready_status("127.0.0.9", selector=pod_selector("hijack")))
    # a warm-pool pod adopted by `warm`: another name, the sandbox's selector labels, no owner reference
    api.create(sandbox_object("agents", "warm", annotations={POD_NAME_ANNOTATION: "pool-x7k2p"}))
    api.set_status(SANDBOX_API, "Sandbox", "agents", "warm", ready_status("127.0.0.9", selector=pod_selector("warm")))
    api.create(pod_object("agents", "pool-x7k2p", "127.0.0.9", labels=dict([pod_selector("warm").split("=", 1)])))
    api.set_status("v1", "Pod", "agents", "pool-x7k2p", {"phase": "Running", "podIP": "127.0.0.9", "podIPs": [{"ip": "127.0.0.9"}]})
    # a pod that names a sandbox of the same name, but an earlier incarnation (another uid)
    api.create(sandbox_object("agents", "stale", annotations={POD_NAME_ANNOTATION: "stale-pod"}))
    api.set_status(SANDBOX_API, "Sandbox", "agents", "stale", ready_status("127.0.0.9"))
    old = {"metadata": {"name": "stale", "uid": "11111111-2222-4333-8444-555555555555"}}
    api.create(pod_object("agents", "stale-pod", "127.0.0.9", sandbox=old, labels={"unrelated": "x"}))
    api.create(sandbox_object("agents", "nopod", annotations={POD_NAME_ANNOTATION: "absent"}))
    api.set_status(SANDBOX_API, "Sandbox", "agents", "nopod", ready_status("127.0.0.9", selector=pod_selector("nopod")))

    async def seen():
        return gw.gateway.sandboxes.registry.find("agents", "nopod") is not None
    assert await wait_for(seen, timeout=5)
    async with aiohttp.ClientSession() as session:
        for name in ("hijack", "stale", "nopod"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with connect(session, gw, f"/gateway/v1/sandboxes/agents/{name}/terminal"):
                    pass
            assert refused.value.status == 502, name
            async with session.get(url(gw, f"/gateway/v1/sandboxes/agents/{name}/terminal"),
                                   headers={"Authorization": f"Bearer {TOKEN}", "Connection": "Upgrade", "Upgrade": "websocket",
                                            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as plain:
                assert plain.status == 502 and (await plain.json())["error"] == "pod_not_in_sandbox"
        async with connect(session, gw, "/gateway/v1/sandboxes/agents/warm/terminal") as ws:
            assert "adopted-ok" in await run(ws, "echo adopted-ok", "warm")

    async def refusals_audited():  # the three repeat one decision: stored once, then rolled up (SPEC §6)
        return await gw.store.count_audit(kind="decision", decision="deny") >= 1
    assert await wait_for(refusals_audited, timeout=5)
    reasons = {r.reasons for r in await gw.store.list_audit(kind="decision", decision="deny")}
    assert reasons == {("pod-not-in-sandbox",)}


async def test_a_detached_shell_keeps_at_most_256_kib_of_output_for_its_replay(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            await run(ws, "true", "ready")
            # two-byte characters: the bound is on bytes, not characters
            await ws.send_str(json.dumps({"type": "input", "data": "sleep 0.5; yes é | head -c 3000000; echo END-$((6*7))\n"}))
        await asyncio.sleep(3)
        async with connect(session, gw) as ws:
            replayed = await read_until(ws, "END-42", timeout=20)
    size = len(replayed.encode())
    assert 200_000 < size <= 256 * 1024 + 4096, size
    assert replayed.count("é") > 60_000


def two_issuer_policies(corp, partner) -> str:
    import yaml

    security = security_policy("sandbox-jwt", {"jwt": {"providers": [
        provider(corp, name="corp"), {**provider(partner, name="partner"), "issuer": PARTNER},
    ]}}, targets=[route_target("sandboxes")], namespace="platform")
    sandbox_policy = {"apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPolicy", "metadata": {"name": "who", "namespace": "platform"},
                      "spec": {"targetRefs": [route_target("sandboxes")], "owner": {"annotation": "sandgate.dev/owner"}}}
    return security + "---\n" + yaml.safe_dump(sandbox_policy, sort_keys=False)


PARTNER = "https://partner.example.test"


async def test_terminals_are_per_principal_issuer_and_subject_and_capped(tmp_path, aiohttp_server):
    corp, partner = await Issuer().start(), await Issuer().start()
    try:
        async with running_kube_api(tmp_path) as api:
            world = SandboxWorld(api, aiohttp_server)
            await world.add("agents", "box-1", owner="alice", shared_with="bob", with_pod=True)
            async with running_gateway(
                tmp_path, router_yaml(), settings=Settings(allow_loopback_sandboxes=True), kubeconfig=api.kubeconfig,
                policies_yaml=two_issuer_policies(corp, partner),
                terminal=TerminalSettings(reconnect_window=30.0, max_per_caller=2, max_total=3),
            ) as gw:
                alice = corp.mint(claims(sub="alice"))
                partner_alice = partner.mint(claims(sub="alice", iss=PARTNER))
                bob = corp.mint(claims(sub="bob"))
                async with aiohttp.ClientSession() as session:
                    # alice (corp) starts a shell and walks away: kept for her reconnect
                    async with connect(session, gw, token=alice) as ws:
                        await run(ws, "WHO=corp-alice", "set")
                    # the same `sub` from another issuer is someone else: a fresh shell
                    async with connect(session, gw, token=partner_alice) as ws:
                        out = await run(ws, "echo who=[$WHO]", "partner")
                        assert "who=[]" in out
                    async with connect(session, gw, token=alice) as ws:
                        assert "who=[corp-alice]" in await run(ws, "echo who=[$WHO]", "resumed")
                        async with connect(session, gw, token=alice) as second:  # her second shell
                            await run(second, "true", "second")
                            # a third is over her cap: 429 with a JSON body, nothing started
                            async with session.get(url(gw, PATH), headers=_upgrade(alice)) as third:
                                body = await third.json()
                                assert third.status == 429 and body["error"] == "too_many_terminals", body
                                assert int(third.headers["Retry-After"]) >= 1
                            assert gw.gateway.sandboxes.terminals.count() == 3  # alice 2, partner-alice 1 (kept)
                            # bob has no shell, but the gateway's total is reached
                            async with session.get(url(gw, PATH), headers=_upgrade(bob)) as over_total:
                                assert over_total.status == 429 and (await over_total.json())["error"] == "too_many_terminals"
                            await second.send_str(json.dumps({"type": "input", "data": "exit\n"}))
                            await read_until(second, '"exit"')

                    async def freed():
                        return gw.gateway.sandboxes.terminals.count((ISSUER, "alice")) == 1
                    assert await wait_for(freed, timeout=5)
                    async with connect(session, gw, token=bob) as ws:  # room again
                        await run(ws, "true", "bob")
    finally:
        await corp.stop()
        await partner.stop()


def _upgrade(token: str) -> dict:
    return {"Authorization": f"Bearer {token}", "Connection": "Upgrade", "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
