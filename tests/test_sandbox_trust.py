"""What the gateway believes of cluster metadata (SPEC §4.1): ownership follows object uids, not
names, and no address taken from cluster state or DNS is dialled before it is checked.

Tests that make the gateway face a metadata address run, when the machine allows it, in a
network namespace with only loopback up (`unshare --net`), so that even a broken filter could
not send a packet anywhere: the outer test re-runs them there and they assert the refusal."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.kube import SANDBOX_CLAIM, KubeClient
from gateway.sandbox.destinations import MAX_RESOLVED, AddressRefused, Destinations, address_allowed
from tests.support.fixtures import issuer, world  # noqa: F401 - fixtures
from tests.support.harness import running_gateway, url
from tests.support.issuer import claims
from tests.support.policy_harness import wait_for
from tests.support.previews import api as preview_api, preview_gateway, token_for, via_host
from tests.support.sandboxes import (
    CLAIM_API, SANDBOX_API, claim_object, pod_selector, ready_status, router_yaml, sandbox_object,
)
from tests.test_sandbox_access import LOOPBACK, jwt_policies, request, sandbox, token_file  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
IN_NETNS = "SANDGATE_TEST_NETNS"

# Addresses a sandbox's status, its Service name or DNS may point at, none of which is a pod.
HOSTILE = [
    "169.254.169.254", "169.254.170.2", "169.254.3.4", "100.100.100.200", "168.63.129.16", "192.0.0.192",
    "fd00:ec2::254", "fe80::1", "::ffff:169.254.169.254", "::ffff:a9fe:a9fe", "64:ff9b::169.254.169.254",
    "2002:a9fe:a9fe::1", "0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "fe80::1%lo", "::169.254.169.254",
    "100.72.1.1", "::ffff:100.100.100.200", "fd20:ce::254", "fd20:ce::1", "::ffff:0:a9fe:a9fe",
    "::ffff:0:169.254.169.254",
]


async def test_remembered_resolutions_are_bounded_whatever_names_are_sent():
    """Each distinct sandbox name is one remembered resolution: a flood of names (here address
    literals and refused ones, which are never looked up in DNS) keeps at most MAX_RESOLVED."""
    destinations = Destinations(allow_loopback=True)
    for i in range(MAX_RESOLVED + 500):
        host = f"127.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" if i % 2 else f"169.254.{i >> 8 & 255}.{i & 255}"
        try:
            await destinations.resolve(host, 80)
        except AddressRefused:
            pass
        assert len(destinations) <= MAX_RESOLVED


@pytest.mark.parametrize("address", HOSTILE)
def test_metadata_and_special_purpose_addresses_are_never_dialable(address):
    assert not address_allowed(address, allow_loopback=True)


@pytest.mark.parametrize("address, loopback, allowed", [
    ("10.244.1.7", False, True), ("fd12:3456::7", False, True), ("100.63.255.1", False, True),  # pod networks
    ("100.64.12.3", False, False), ("100.127.255.254", False, False), ("100.128.0.1", False, True),
    ("172.16.0.9", False, True), ("2600:1f18::1", False, True),
    ("127.0.0.5", False, False), ("127.0.0.5", True, True), ("::1", False, False), ("::ffff:127.0.0.1", False, False),
    ("not-an-ip", True, False), ("", True, False),
])
def test_pod_networks_are_dialable_and_loopback_only_in_local_runs(address, loopback, allowed):
    assert address_allowed(address, allow_loopback=loopback) is allowed


def _netns_only(test):
    """Run only inside the network namespace when one can be made (see module docstring)."""
    can = shutil.which("unshare") and shutil.which("ip") and os.geteuid() == 0
    return pytest.mark.skipif(bool(can) and not os.environ.get(IN_NETNS), reason="runs inside a network namespace")(test)


def test_address_refusals_hold_inside_a_loopback_only_network_namespace():
    if not (shutil.which("unshare") and shutil.which("ip") and os.geteuid() == 0):
        pytest.skip("needs root, unshare and ip for a network namespace; the tests ran in-process instead")
    script = 'ip link set lo up && ip -brief link && exec "$0" -m pytest -q -p no:cacheprovider "$1" -k netns'
    env = {**os.environ, IN_NETNS: "1"}
    done = subprocess.run(["unshare", "--net", "sh", "-c", script, sys.executable, __file__], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    links = [line.split()[0] for line in done.stdout.splitlines() if line.split() and line.split()[0] in ("lo", "eth0")]
    assert links == ["lo"], done.stdout[:500]
    assert " passed" in done.stdout and "failed" not in done.stdout


@_netns_only
async def test_netns_dns_names_resolving_to_metadata_addresses_are_refused_before_dialling(tmp_path, world, token_file):
    _, port = await world.add("agents", "good")
    good_ip = world.apps[("agents", "good")].host
    overrides = {f"good.agents.svc.cluster.local:{port}": (good_ip, port)}
    names = {}
    for i, address in enumerate(HOSTILE):
        name = f"evil-{i}"
        names[name] = address
        overrides[f"{name}.agents.svc.cluster.local:80"] = (address, 80)
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file), resolution="DNS"),
                               overrides=overrides, settings=LOOPBACK) as gw:
        good = await request(gw, "/", headers=sandbox("good", port))
        refused = {name: await request(gw, "/", headers=sandbox(name, 80)) for name in names}
        again = await request(gw, "/", headers=sandbox("evil-0", 80))  # the cached refusal
    assert good[0] == 200 and good[2]["backend"] == "agents/good"
    for name, (status, _, body) in refused.items():
        assert status == 502 and body["error"] == "address_not_allowed", (names[name], status, body)
    assert again[0] == 502 and again[2]["error"] == "address_not_allowed"


@_netns_only
async def test_netns_cluster_state_naming_metadata_addresses_is_refused_before_dialling(tmp_path, world, token_file):
    """A Sandbox status whose pod IPs or serviceFQDN lead to a metadata address."""
    overrides = {}
    for i, address in enumerate(HOSTILE[:6]):
        world.api.create(sandbox_object("agents", f"ip-{i}"))
        world.api.set_status(SANDBOX_API, "Sandbox", "agents", f"ip-{i}", ready_status(address))
        world.api.create(sandbox_object("agents", f"svc-{i}"))
        world.api.set_status(SANDBOX_API, "Sandbox", "agents", f"svc-{i}", ready_status(None, service_fqdn=f"svc-{i}.example.internal"))
        overrides[f"svc-{i}.example.internal:80"] = (address, 80)
    async with running_gateway(tmp_path, router_yaml(token_file=str(token_file)), overrides=overrides,
                               settings=LOOPBACK, kubeconfig=world.api.kubeconfig) as gw:
        by_ip = [await request(gw, "/", headers=sandbox(f"ip-{i}", 80)) for i in range(6)]
        by_name = [await request(gw, "/", headers=sandbox(f"svc-{i}", 80)) for i in range(6)]
    assert [(s, b["error"]) for s, _, b in by_ip] == [(503, "address_not_allowed")] * 6
    assert [(s, b["error"]) for s, _, b in by_name] == [(502, "address_not_allowed")] * 6


@_netns_only
async def test_netns_a_preview_whose_sandbox_has_only_a_service_name_is_dialled_only_where_allowed(tmp_path, world, issuer):
    """Previews resolve a Sandbox's serviceFQDN like DNS resolution does, and cluster state is
    hostile: a serviceFQDN that is (or resolves to) a metadata address is refused before
    dialling; one leading to an allowed address is served."""
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    app_ip = world.apps[("agents", "box-1")].host
    alice = token_for(issuer)
    overrides = {f"good.example.internal:{port}": (app_ip, port)}
    overrides |= {f"evil-{i}.example.internal:{port}": (address, port) for i, address in enumerate(HOSTILE)}
    names = ["good.example.internal", *(f"evil-{i}.example.internal" for i in range(len(HOSTILE))), *HOSTILE]
    async with preview_gateway(tmp_path, world, issuer, overrides=overrides) as gw:
        status, created = await preview_api(gw, "POST", "/gateway/v1/previews", alice,
                                            {"namespace": "agents", "sandbox": "box-1", "port": port})
        assert status == 201, created
        host = created["url"].split("://", 1)[1].split("/", 1)[0]
        answers = {}
        for name in names:
            status_now = ready_status(None, service_fqdn=name, selector=pod_selector("box-1"))
            world.api.set_status(SANDBOX_API, "Sandbox", "agents", "box-1", status_now)

            async def seen(fqdn=name):
                info = gw.gateway.sandboxes.registry.find("agents", "box-1")
                return info is not None and info.service_fqdn == fqdn and not info.pod_ips
            assert await wait_for(seen, timeout=5)
            answers[name] = await via_host(gw, host, "/")
    assert answers.pop("good.example.internal")[0] == 200
    refused = {name: (answer[0], answer[2]["error"]) for name, answer in answers.items()}
    assert refused == {name: (502, "address_not_allowed") for name in answers}, refused


# --- ownership follows uids ------------------------------------------------------------------


async def test_a_claim_recreated_under_the_same_name_does_not_inherit_the_old_sandbox(tmp_path, world, issuer):
    """alice's claim goes, a same-named claim of mallory's comes while alice's sandbox is still
    there (orphaned, or its garbage collection pending): neither may reach it. Once the sandbox
    is replaced by mallory's own, alice gets 404 and mallory her sandbox."""
    _, port = await world.add("agents", "box", owner="alice")
    # a second sandbox whose owner reference names a claim uid that no longer exists
    stale = claim_object("agents", "pending", annotations={"sandgate.dev/owner": "alice"})
    stale["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000"
    world.api.create(sandbox_object("agents", "pending", owner_claim=stale))
    world.api.set_status(SANDBOX_API, "Sandbox", "agents", "pending",
                         ready_status(world.apps[("agents", "box")].host))
    async with running_gateway(tmp_path, router_yaml(), settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                               policies_yaml=jwt_policies(issuer)) as gw:
        def as_user(sub, name="box"):
            return request(gw, "/", headers=sandbox(name, port), token=issuer.mint(claims(sub=sub)))

        assert (await as_user("alice"))[0] == 200
        world.api.delete(CLAIM_API, "SandboxClaim", "agents", "box", propagation="Orphan")
        world.api.create(claim_object("agents", "box", annotations={"sandgate.dev/owner": "mallory"}))
        world.api.create(claim_object("agents", "pending", annotations={"sandgate.dev/owner": "mallory"}))

        async def alice_lost_it():
            return (await as_user("alice"))[0] == 404
        assert await wait_for(alice_lost_it, timeout=10)
        orphaned_for_mallory = await as_user("mallory")
        pending_for_mallory = await as_user("mallory", "pending")

        world.api.delete(SANDBOX_API, "Sandbox", "agents", "box")
        claim = world.api.get(CLAIM_API, "SandboxClaim", "agents", "box")
        world.api.create(sandbox_object("agents", "box", owner_claim=claim))
        world.api.set_status(SANDBOX_API, "Sandbox", "agents", "box", ready_status(world.apps[("agents", "box")].host))

        async def mallory_has_hers():
            return (await as_user("mallory"))[0] == 200
        assert await wait_for(mallory_has_hers, timeout=10)
        alice_after = await as_user("alice")
    assert orphaned_for_mallory[0] == 404 and orphaned_for_mallory[2]["error"] == "sandbox_not_found"
    assert pending_for_mallory[0] == 404
    assert alice_after[0] == 404


# --- access withdrawn while streams are open ---------------------------------------------------


async def test_removing_a_user_from_shared_with_ends_their_open_streams_within_a_second(tmp_path, world, issuer):
    """bob, shared into alice's sandbox, holds a WebSocket (header-routed), an event stream (port
    proxy) and a terminal; alice holds a WebSocket. Removing bob from shared-with ends bob's
    three promptly and leaves alice's alone."""
    _, port = await world.add("agents", "box", owner="alice", shared_with="bob, carol", with_pod=True)
    async with running_gateway(tmp_path, router_yaml(), settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                               policies_yaml=jwt_policies(issuer)) as gw:
        bob = {"Authorization": f"Bearer {issuer.mint(claims(sub='bob'))}"}
        alice = {"Authorization": f"Bearer {issuer.mint(claims(sub='alice'))}"}
        async with aiohttp.ClientSession() as session:
            bob_ws = await session.ws_connect(url(gw, "/ws"), headers={**bob, **sandbox("box", port)})
            alice_ws = await session.ws_connect(url(gw, "/ws"), headers={**alice, **sandbox("box", port)})
            bob_terminal = await session.ws_connect(url(gw, "/gateway/v1/sandboxes/agents/box/terminal"), headers=bob)
            events = await session.get(url(gw, f"/gateway/v1/sandboxes/agents/box/ports/{port}/sse?n=600&interval=0.1"), headers=bob)
            assert events.status == 200
            for ws in (bob_ws, alice_ws):
                await ws.receive()  # the echo's hello
            await bob_terminal.send_str(json.dumps({"type": "input", "data": "echo up-$((40+2))\n"}))
            async with asyncio.timeout(10):
                while "up-42" not in (msg := await bob_terminal.receive()).data:
                    pass
            assert (await events.content.readline()).startswith(b"id: ")

            kube = await KubeClient.connect(str(world.api.kubeconfig))
            try:
                await kube.merge_patch(SANDBOX_CLAIM, "agents", "box", {"metadata": {"annotations": {"sandgate.dev/shared-with": "carol"}}})
            finally:
                await kube.close()
            started = time.monotonic()
            closing = await asyncio.wait_for(bob_ws.receive(), 5)
            ws_took = time.monotonic() - started
            terminal_frames = []
            async with asyncio.timeout(5):
                while (msg := await bob_terminal.receive()).type == aiohttp.WSMsgType.TEXT:
                    terminal_frames.append(msg.data)
            cut = None
            try:
                async with asyncio.timeout(5):
                    while await events.content.readline():
                        pass
            except aiohttp.ClientPayloadError as e:
                cut = e
            stream_took = time.monotonic() - started
            await alice_ws.send_str("still here")
            alice_echo = await asyncio.wait_for(alice_ws.receive(), 5)
            after = await request(gw, "/", headers=sandbox("box", port), token=issuer.mint(claims(sub="bob")))
            events.close()
            await alice_ws.close()
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and bob_ws.close_code == 1008
    assert "withdrawn" in (closing.extra or "")
    assert ws_took < 3 and stream_took < 3  # "within a second", with room for a loaded machine
    assert cut is not None or events.content.at_eof()
    assert any("withdrawn" in frame for frame in terminal_frames), terminal_frames
    assert alice_echo.data == "still here"
    assert after[0] == 404
