"""BackendTrafficPolicy `retry`: idempotent requests tried again as Envoy would, through a running
gateway to a real upstream that fails on purpose."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from collections import defaultdict
from time import monotonic

import aiohttp
import pytest
from aiohttp import web

from gateway.config.loader import load_routes_from_string
from gateway.policy.loader import load_policies
from gateway.config.loader import LoadOptions, load_routes
from tests.support.harness import GATEWAY, access_records, admin_url, backend, free_port, route_to, running_gateway, url
from tests.test_policy_traffic import traffic_policy


ATTEMPTS = web.AppKey("attempts", dict)
BODIES = web.AppKey("bodies", dict)


def flaky_app() -> web.Application:
    """Fails the first `times` attempts of each X-Key as `how` says, then answers 200 with what
    it received. `how`: a status code, `reset` (close without answering), `slow` (answer after
    2 s), or `grpc-N` (200 with grpc-status N)."""
    attempts: dict[str, int] = defaultdict(int)
    bodies: dict[str, list[bytes]] = defaultdict(list)

    async def handle(request: web.Request) -> web.StreamResponse:
        key = request.headers["X-Key"]
        attempts[key] += 1
        bodies[key].append(await request.read())
        if attempts[key] <= int(request.query.get("times", "0")):
            how = request.query["how"]
            if how == "reset":
                request.transport.close()
                await asyncio.sleep(1)
            elif how == "slow":
                await asyncio.sleep(2)
            elif how.startswith("grpc-"):
                return web.Response(headers={"grpc-status": how[5:]}, text="grpc failure")
            else:
                return web.Response(status=int(how), text="failure")
        return web.json_response({"attempt": attempts[key], "body": bodies[key][-1].decode()})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app[ATTEMPTS] = attempts
    app[BODIES] = bodies
    return app


@pytest.fixture
async def flaky(aiohttp_server):
    return await aiohttp_server(flaky_app(), host="127.0.0.1")


def retry_policy(retry: str, timeout: str = "") -> str:
    return traffic_policy(f"  retry:\n{retry}{timeout}", name="retries")


async def call(gw, method: str, key: str, query: str, **kwargs):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url(gw, f"/x?{query}"), headers={"X-Key": key}, **kwargs) as resp:
            return resp.status, await resp.read()


async def metric(gw, name: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(admin_url(gw, "/metrics")) as resp:
        return next((line for line in (await resp.text()).splitlines() if line.startswith(name)), "")


async def test_get_is_retried_on_503_by_default_until_it_succeeds(flaky, tmp_path):
    routes = GATEWAY + backend("app", flaky.port) + route_to("app")
    async with running_gateway(tmp_path, routes, policies_yaml=retry_policy("    {}\n")) as gw:
        status, body = await call(gw, "GET", "a", "how=503&times=2")
        assert (status, json.loads(body)["attempt"]) == (200, 3)
        assert await metric(gw, "sandgate_upstream_retries_total") == 'sandgate_upstream_retries_total{route="infra/app"} 2.0'
        assert access_records(gw)[-1]["retries"] == 2

        status, body = await call(gw, "GET", "b", "how=503&times=5")
        assert (status, body) == (503, b"failure")  # the last answer, once numRetries (2) are spent
        assert flaky.app[ATTEMPTS]["b"] == 3


async def test_requests_that_may_not_run_twice_are_sent_once(flaky, tmp_path):
    routes = GATEWAY + backend("app", flaky.port) + route_to("app")
    policy = retry_policy("    retryOn: {triggers: [5xx]}\n")
    async with running_gateway(tmp_path, routes, policies_yaml=policy) as gw:
        assert (await call(gw, "POST", "post", "how=500&times=1", data=b"pay once"))[0] == 500
        assert flaky.app[ATTEMPTS]["post"] == 1

        async def chunked():
            yield b"unknown "
            yield b"length"

        # PUT is idempotent, but a body of unknown length is streamed, never kept for a replay.
        assert (await call(gw, "PUT", "chunked", "how=500&times=1", data=chunked()))[0] == 500
        assert flaky.app[ATTEMPTS]["chunked"] == 1
        # Nor one over 64 KiB: it streams through once.
        assert (await call(gw, "PUT", "large", "how=500&times=1", data=b"x" * (64 * 1024 + 1)))[0] == 500
        assert flaky.app[ATTEMPTS]["large"] == 1


async def test_a_small_put_body_is_sent_again_whole(flaky, tmp_path):
    routes = GATEWAY + backend("app", flaky.port) + route_to("app")
    policy = retry_policy("    retryOn: {triggers: [5xx]}\n")
    async with running_gateway(tmp_path, routes, policies_yaml=policy) as gw:
        status, body = await call(gw, "PUT", "put", "how=502&times=1", data=b"x" * 40_000)
        assert status == 200 and json.loads(body) == {"attempt": 2, "body": "x" * 40_000}
        assert flaky.app[BODIES]["put"] == [b"x" * 40_000] * 2


async def test_only_the_configured_triggers_retry(flaky, tmp_path):
    routes = GATEWAY + backend("app", flaky.port) + route_to("app")
    policy = retry_policy("    numRetries: 3\n    retryOn: {triggers: [retriable-status-codes], httpStatusCodes: [429]}\n")
    async with running_gateway(tmp_path, routes, policies_yaml=policy) as gw:
        # First, on a new connection: a reset on a kept-alive one is sent again whatever the policy.
        assert (await call(gw, "GET", "reset", "how=reset&times=1"))[0] == 502
        status, body = await call(gw, "GET", "429", "how=429&times=2")
        assert (status, json.loads(body)["attempt"]) == (200, 3)
        assert (await call(gw, "GET", "503", "how=503&times=1"))[0] == 503  # 503 is no longer listed
        assert flaky.app[ATTEMPTS]["503"] == flaky.app[ATTEMPTS]["reset"] == 1


@pytest.mark.parametrize("how, trigger", [("reset", "reset"), ("grpc-14", "unavailable"), ("409", "retriable-4xx"),
                                          ("504", "gateway-error")])
async def test_each_trigger_retries_its_failure(flaky, tmp_path, how, trigger):
    routes = GATEWAY + backend("app", flaky.port) + route_to("app")
    policy = retry_policy(f"    retryOn: {{triggers: [{trigger}]}}\n")
    async with running_gateway(tmp_path, routes, policies_yaml=policy) as gw:
        status, body = await call(gw, "GET", how, f"how={how}&times=1")
        assert (status, json.loads(body)["attempt"]) == (200, 2)


@pytest.mark.parametrize("grpc_status", ["banana", "14x", "", "1" * 5000])
async def test_a_garbage_grpc_status_from_the_upstream_is_no_trigger(flaky, tmp_path, grpc_status):
    routes = GATEWAY + backend("app", flaky.port) + route_to("app")
    policy = retry_policy("    retryOn: {triggers: [cancelled, unavailable, internal]}\n")
    async with running_gateway(tmp_path, routes, policies_yaml=policy) as gw:
        status, body = await call(gw, "GET", "g", f"how=grpc-{grpc_status}&times=1")
        assert (status, body) == (200, b"grpc failure")
        assert flaky.app[ATTEMPTS]["g"] == 1


async def test_a_connect_failure_is_retried_on_another_endpoint(flaky, tmp_path):
    dead = free_port()
    routes = GATEWAY + f"""\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: app, namespace: infra}}
spec:
  endpoints:
  - ip: {{address: 127.0.0.1, port: {dead}}}
  - ip: {{address: 127.0.0.1, port: {flaky.port}}}
""" + route_to("app")
    policy = retry_policy("    numRetries: 1\n    retryOn: {triggers: [connect-failure]}\n")
    async with running_gateway(tmp_path, routes, policies_yaml=policy) as gw:
        statuses = [(await call(gw, "GET", f"k{i}", ""))[0] for i in range(4)]
        assert statuses == [200] * 4
        # Round robin sends each first attempt to the dead endpoint, each retry to the live one.
        assert await metric(gw, "sandgate_upstream_retries_total") == 'sandgate_upstream_retries_total{route="infra/app"} 4.0'
        assert {r["upstream"] for r in access_records(gw)} == {f"127.0.0.1:{flaky.port}"}
    (tmp_path / "without").mkdir()
    async with running_gateway(tmp_path / "without", routes) as gw:  # the same without the policy
        assert sorted([(await call(gw, "GET", f"n{i}", ""))[0] for i in range(4)]) == [200, 200, 502, 502]


async def test_a_per_try_timeout_cuts_a_slow_attempt_and_tries_again(flaky, tmp_path):
    routes = GATEWAY + backend("app", flaky.port) + route_to("app")
    policy = retry_policy("    retryOn: {triggers: [reset]}\n    perRetry: {timeout: 300ms}\n")
    async with running_gateway(tmp_path, routes, policies_yaml=policy) as gw:
        started = monotonic()
        status, body = await call(gw, "GET", "slow", "how=slow&times=1")
        assert (status, json.loads(body)["attempt"]) == (200, 2)
        assert monotonic() - started < 1.5


async def test_the_request_timeout_bounds_all_attempts_together(flaky, tmp_path):
    routes = GATEWAY + backend("app", flaky.port) + route_to("app")
    policy = retry_policy("    numRetries: 20\n    retryOn: {triggers: [reset]}\n    perRetry: {timeout: 200ms}\n",
                          "  timeout:\n    http: {requestTimeout: 700ms}\n")
    async with running_gateway(tmp_path, routes, policies_yaml=policy) as gw:
        started = monotonic()
        status, body = await call(gw, "GET", "stuck", "how=slow&times=100")
        assert status == 504 and b"upstream_timeout" in body
        assert monotonic() - started < 1.5
        assert 2 <= flaky.app[ATTEMPTS]["stuck"] <= 4


async def test_a_client_that_breaks_off_its_body_leaves_the_gateway_serving(flaky, tmp_path):
    routes = GATEWAY + backend("app", flaky.port) + route_to("app")
    async with running_gateway(tmp_path, routes, policies_yaml=retry_policy("    {}\n")) as gw:
        host, port = next(iter(gw.addresses.values()))
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"PUT /x HTTP/1.1\r\nHost: a\r\nX-Key: cut\r\nContent-Length: 1000\r\n\r\nonly part")
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.2)
        assert flaky.app[ATTEMPTS]["cut"] == 0  # an incomplete body is never sent on
        assert (await call(gw, "GET", "after", ""))[0] == 200


def test_retry_settings_load_with_envoy_gateway_defaults(tmp_path):
    config = load_routes_from_string(GATEWAY + backend("app", 1) + route_to("app"))

    def load(retry: str):
        (tmp_path / "p.yaml").write_text(retry_policy(retry))
        return load_policies(str(tmp_path), config)

    retry = load("    {}\n").traffic_for("infra/app", 0, "infra/gw").retry
    assert retry.attempts == 3 and retry.status_codes == {503} and retry.per_try_timeout is None
    assert retry.triggers == {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
    assert (retry.base_interval, retry.max_interval) == (0.025, 0.25)
    retry = load("    numRetries: 0\n    retryOn: {httpStatusCodes: [502]}\n"
                 "    perRetry: {timeout: 1s, backOff: {baseInterval: 100ms}}\n").traffic_for("infra/app", 0, "infra/gw").retry
    assert (retry.attempts, retry.status_codes, retry.per_try_timeout, retry.max_interval) == (1, {502}, 1.0, 1.0)
    assert "retriable-status-codes" in retry.triggers  # triggers unset: the defaults stay

    errors = load("    numAttemptsPerPriority: 2\n").errors
    assert len(errors) == 1 and "numAttemptsPerPriority is not supported by this build" in errors[0]
    errors = load("    perRetry: {backOff: {baseInterval: 1s, maxInterval: 100ms}}\n").errors
    assert len(errors) == 1 and "maxInterval not below it" in errors[0]


def test_the_example_traffic_policy_loads_on_the_shipped_routes(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    config = load_routes(str(repo / "routes.yaml"), LoadOptions())
    (tmp_path / "traffic.yaml").write_text((repo / "policies/examples/traffic.yaml").read_text())
    loaded = load_policies(str(tmp_path), config)
    assert not loaded.errors and not loaded.problems, (loaded.errors, loaded.problems)
    gateway = config.listeners[0].gateway
    for route in ("platform/platform-api", "platform/frontend"):
        retry = loaded.traffic_for(route, 0, gateway).retry
        assert (retry.attempts, retry.status_codes, retry.per_try_timeout) == (3, {503}, 10.0), route
    assert loaded.traffic_for("platform/mcp", 0, gateway) is None
