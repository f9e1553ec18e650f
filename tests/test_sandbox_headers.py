"""`X-Sandbox-*` headers as hostile input (SPEC §4.1, §3.3): the timeout's accepted format, and
that refusing thousands of bad values keeps nothing of those requests alive.

A `DNS` SandboxRouter without any Kubernetes API in front of a real app on loopback: the
gateway resolves `box-1.agents.svc.cluster.local` through its overrides, as a local run does.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import aiohttp
import pytest
from aiohttp import web

from gateway.sandbox.address import BadSandboxRequest
from gateway.server.handler import Settings
from tests.support.harness import running_gateway, url
from tests.support.recording import Recorded, start_recording_echo
from tests.support.sandboxes import router_yaml


@pytest.fixture
async def box(aiohttp_server) -> Recorded:
    """The sandbox `agents/box-1`: the echo app, remembering what reached it."""
    return await start_recording_echo(aiohttp_server, "agents/box-1")


def dns_gateway(tmp_path, box, *, timeout: str | None = None):
    """A gateway whose only SandboxRouter resolves by DNS; no kubeconfig exists."""
    overrides = {f"box-1.agents.svc.cluster.local:{box.port}": ("127.0.0.1", box.port)}
    return running_gateway(tmp_path, router_yaml(resolution="DNS", allow_unauthenticated=True, timeout=timeout,
                                                 default_port=box.port),
                           overrides=overrides, kubeconfig=tmp_path / "no-such-kubeconfig",
                           settings=Settings(allow_loopback_sandboxes=True))  # the resolved address is loopback


# --- X-Sandbox-Timeout: what the agent-sandbox clients send --------------------------------------

ACCEPTED = [
    "65.123456789", "3.3333333333333335", "1e-05", "10000000.0",  # the SPEC's own examples
    str(60), str(0.1), str(123.0), str(7.25e-06), str(2.5e16), str(1e16), str(5e-324),  # str() of others
    "1", "007", "1E3", "1e+3", "0.5e1", "9" * 32,
]
REJECTED = [
    "0", "0.0", "0e5", "1e-999",  # zero, also once parsed
    "-1", "-0.5", "+5", "nan", "NaN", "inf", "-inf", "Infinity",
    "0x10", "1_000", "1 000", "5 s", "５", "٣", "1.", ".5", "1e", "e5", "1.5.2", "1e5.0",
    "5s", "180s", "", "1" * 33, "0." + "1" * 31,
]  # (whitespace around a value is not part of it in HTTP: " 5" is "5")


@pytest.mark.parametrize("value", ACCEPTED)
async def test_timeouts_the_clients_send_are_accepted(tmp_path, box, value):
    async with dns_gateway(tmp_path, box, timeout="30s") as gw, aiohttp.ClientSession() as session:
        async with session.get(url(gw, "/run"), headers={"X-Sandbox-ID": "box-1", "X-Sandbox-Timeout": value}) as r:
            status, body = r.status, await r.json()
    if float(value) >= 1:
        assert status == 200 and body["backend"] == "agents/box-1", body
    else:  # a deadline of microseconds may pass before the app answers: that is the client's wish
        assert status == 200 or (status == 504 and body["error"] == "upstream_timeout"), body
    assert not [name for _, _, headers in box.requests for name, _ in headers if name.lower().startswith("x-sandbox-")]


async def test_every_rejected_timeout_is_a_400_that_reaches_nothing(tmp_path, box):
    async with dns_gateway(tmp_path, box) as gw, aiohttp.ClientSession() as session:
        for value in REJECTED:
            async with session.get(url(gw, "/run"), headers={"X-Sandbox-ID": "box-1", "X-Sandbox-Timeout": value}) as r:
                body = await r.json()
                assert r.status == 400, (value, body)
                assert body["error"] == "bad_request" and "X-Sandbox-Timeout" in body["message"] and body["request_id"]
    assert box.requests == []


@pytest.mark.parametrize("value", ["1e999", "10000000.0", "31.5"])
async def test_a_timeout_above_the_routers_is_capped_at_it(tmp_path, box, value):
    """`1e999` is a number too, only beyond a float: capped like any other larger value."""
    async with dns_gateway(tmp_path, box, timeout="1s") as gw, aiohttp.ClientSession() as session:
        started = time.monotonic()
        headers = {"X-Sandbox-ID": "box-1", "X-Sandbox-Timeout": value, "X-Echo-Delay": "5"}
        async with session.get(url(gw, "/slow"), headers=headers) as r:
            status, body = r.status, await r.json()
        took = time.monotonic() - started
    assert status == 504 and body["error"] == "upstream_timeout"
    assert took < 4, took  # the router's 1 s, not the header's, nor the app's 5 s


async def test_a_huge_timeout_without_a_router_timeout_still_reaches_the_sandbox(tmp_path, box):
    async with dns_gateway(tmp_path, box) as gw, aiohttp.ClientSession() as session:
        for value in ("1e999", "1" * 32):
            async with session.get(url(gw, "/"), headers={"X-Sandbox-ID": "box-1", "X-Sandbox-Timeout": value}) as r:
                assert r.status == 200, (value, await r.text())


async def test_pod_ip_and_uid_headers_are_accepted_ignored_and_never_reach_the_sandbox(tmp_path, box):
    """The agent-sandbox client sends `X-Sandbox-Pod-IP`; whatever it says, the gateway resolves
    the sandbox itself (here the metadata address: dialled, it would fail, not reach the box)."""
    headers = {"X-Sandbox-ID": "box-1", "X-Sandbox-Pod-IP": "169.254.169.254", "X-Sandbox-UID": "../../etc",
               "X-Sandbox-Timeout": "65.123456789"}
    async with dns_gateway(tmp_path, box) as gw, aiohttp.ClientSession() as session:
        async with session.get(url(gw, "/"), headers=headers) as r:
            status, body = r.status, await r.json()
    assert status == 200 and body["backend"] == "agents/box-1" and body["peer"] == "127.0.0.1"
    assert not [name for name, _ in body["headers"] if name.lower().startswith("x-sandbox-")]


# --- refusals keep nothing alive ----------------------------------------------------------------


def hostile(i: int) -> list[tuple[str, str]]:
    """Bad X-Sandbox-* values: distinct and long, distinct and short, one repeated, repeated headers."""
    kind = i % 5
    if kind == 0:
        return [("X-Sandbox-ID", f"Not-A-Label-{i}-" + "x" * 4000)]
    if kind == 1:
        return [("X-Sandbox-ID", f"bad_{i}")]
    if kind == 2:
        return [("X-Sandbox-ID", "box-1"), ("X-Sandbox-Timeout", f"-{i}.5")]
    if kind == 3:
        return [("X-Sandbox-ID", "box-1"), ("X-Sandbox-Port", "99999")]  # the same every time
    return [("X-Sandbox-ID", "box-1"), ("X-Sandbox-ID", f"box-{i}")]


def live(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def test_thousands_of_bad_sandbox_headers_keep_no_request_alive(tmp_path, box):
    """Every refusal is a 400 with the §3.3 body; afterwards no exception and no request of
    theirs is still referenced, and the gateway's Python heap has not grown with them."""
    async with dns_gateway(tmp_path, box) as gw, aiohttp.ClientSession() as session:
        target = url(gw, "/")

        async def send(i: int) -> None:
            async with session.get(target, headers=hostile(i)) as r:
                body = await r.json()
                assert r.status == 400 and body["error"] == "bad_request" and body["request_id"], (i, body)

        for i in range(50):  # warm-up: first-use allocations are not growth
            await send(i)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(50, 5050):
                await send(i)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        requests_alive = live(web.BaseRequest)
        exceptions_alive = live(BadSandboxRequest)
    assert box.requests == []
    # 5,000 refusals, 1,000 of them with 4 KB values (43 MiB stayed when exceptions were cached):
    # what may stay is small cache entries and the test's in-memory access log (about 2 MiB).
    assert grown < 8 * 2**20, f"{grown / 2**20:.1f} MiB"
    assert requests_alive <= 2, requests_alive  # none in flight; a handler's own at most
    assert exceptions_alive == 0
