"""BackendTrafficPolicy (local rate limits, timeouts) and ClientTrafficPolicy (trusted hops,
header and body limits), through a running gateway to a real upstream."""

from __future__ import annotations

import asyncio
import ipaddress

import aiohttp
import pytest

from gateway.policy.ratelimit import LocalRateLimiter, RateLimitRule, SourceSelector
from tests.support.fixtures import issuer, recording_echo  # noqa: F401 (fixtures)
from tests.support.harness import GATEWAY, admin_url, backend, running_gateway, route_to, url
from tests.support.rawhttp import closed_within


def traffic_policy(spec: str, name: str = "limits") -> str:
    return f"""\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {{name: {name}, namespace: infra}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}}]
{spec}"""


def client_policy(spec: str) -> str:
    return f"""\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {{name: edge, namespace: infra}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw}}]
{spec}"""


@pytest.fixture
async def app(echo_servers):
    servers = await echo_servers("app")
    return GATEWAY + backend("app", servers["app"][1]) + route_to("app")


async def get(session, gw, path="/", **kwargs):
    async with session.get(url(gw, path), **kwargs) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_route_limit_refuses_with_429_and_rate_headers(app, echo_servers, tmp_path):
    policy = traffic_policy("""  rateLimit:
    type: Local
    local:
      rules:
      - limit: {requests: 3, unit: Minute}
""")
    async with running_gateway(tmp_path, app, policies_yaml=policy) as gw, aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(3):
            status, headers, _ = await get(session, gw)
            statuses.append(status)
            assert headers["X-RateLimit-Limit"] == "3"
        assert statuses == [200, 200, 200]
        assert headers["X-RateLimit-Remaining"] == "0"
        status, headers, body = await get(session, gw)
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        assert headers["X-RateLimit-Remaining"] == "0"
        assert 0 < int(headers["X-RateLimit-Reset"]) <= 60
        assert b'"rate_limited"' in body
        async with session.get(admin_url(gw, "/metrics")) as m:
            assert 'sandgate_ratelimited_total{route="infra/app"} 1.0' in await m.text()


async def test_distinct_header_values_get_their_own_buckets(app, tmp_path):
    policy = traffic_policy("""  rateLimit:
    type: Local
    local:
      rules:
      - clientSelectors:
        - headers: [{name: X-User, type: Distinct}]
        limit: {requests: 1, unit: Hour}
""")
    async with running_gateway(tmp_path, app, policies_yaml=policy) as gw, aiohttp.ClientSession() as session:
        assert (await get(session, gw, headers={"X-User": "alice"}))[0] == 200
        assert (await get(session, gw, headers={"X-User": "alice"}))[0] == 429
        assert (await get(session, gw, headers={"X-User": "bob"}))[0] == 200
        status, headers, _ = await get(session, gw)  # no X-User: the rule does not apply
        assert status == 200 and "X-RateLimit-Limit" not in headers


async def test_trusted_hops_pick_the_client_ip_for_distinct_source_limits(app, tmp_path):
    policies = client_policy("""  clientIPDetection:
    xForwardedFor: {numTrustedHops: 1}
""") + traffic_policy("""  rateLimit:
    type: Local
    local:
      rules:
      - clientSelectors:
        - sourceCIDR: {type: Distinct, value: 0.0.0.0/0}
        limit: {requests: 1, unit: Hour}
""")
    async with running_gateway(tmp_path, app, policies_yaml=policies) as gw, aiohttp.ClientSession() as session:
        first = {"X-Forwarded-For": "198.51.100.7"}
        assert (await get(session, gw, headers=first))[0] == 200
        assert (await get(session, gw, headers=first))[0] == 429
        assert (await get(session, gw, headers={"X-Forwarded-For": "198.51.100.8"}))[0] == 200
        # A forged leftmost entry does not help: the trusted hop's (rightmost) entry counts.
        assert (await get(session, gw, headers={"X-Forwarded-For": "203.0.113.1, 198.51.100.7"}))[0] == 429


async def test_client_policy_limits_headers_and_body(app, tmp_path):
    policies = client_policy("""  headers: {maxRequestHeaderLimit: 2Ki}
  connection: {bufferLimit: 1Ki}
""")
    async with running_gateway(tmp_path, app, policies_yaml=policies) as gw, aiohttp.ClientSession() as session:
        assert (await get(session, gw, headers={"X-Big": "x" * 3000}))[0] == 431
        async with session.post(url(gw, "/"), data=b"x" * 2048) as resp:
            assert resp.status == 413
        async with session.post(url(gw, "/"), data=b"x" * 512) as resp:
            assert resp.status == 200
            assert (await resp.json())["body_length"] == 512


async def test_client_policy_connection_limit_closes_connections_over_it(app, tmp_path):
    """connection.connectionLimit: while 3 connections are open a 4th is closed unanswered; once
    one of them closes, a new one is served again."""
    policy = client_policy("  connection:\n    connectionLimit: {value: 3}\n")
    async with running_gateway(tmp_path, app, policies_yaml=policy) as gw:
        host, port = next(iter(gw.addresses.values()))
        request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

        async def connect_and_get():
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            return reader, writer, await reader.read(65536)

        held = [await connect_and_get() for _ in range(3)]
        assert all(answer.startswith(b"HTTP/1.1 200") for _, _, answer in held)
        reader, writer, answer = await connect_and_get()
        assert answer == b"", f"a 4th connection was answered: {answer[:60]!r}"
        writer.close()
        async with aiohttp.ClientSession() as session, session.get(admin_url(gw, "/metrics")) as m:
            assert 'sandgate_connections_rejected_total{port="80"} 1.0' in await m.text()  # the Gateway's port
        held[0][1].close()
        await held[0][1].wait_closed()
        await asyncio.sleep(0.1)
        _, writer, answer = await connect_and_get()
        assert answer.startswith(b"HTTP/1.1 200"), "a connection under the limit was refused"
        writer.close()
        for _, w, _ in held[1:]:
            w.close()


async def _raw_get(host: str, port: int, reader=None, writer=None, extra: str = ""):
    """One GET on a kept (or new) connection, its body read whole: (reader, writer, response head)."""
    if reader is None:
        reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    return reader, writer, head


async def test_client_policy_max_requests_per_connection_closes_after_the_last(app, tmp_path):
    """connectionLimit.maxRequestsPerConnection: 2: the first response keeps the connection, the
    second says Connection: close and the gateway closes it."""
    policy = client_policy("  connection:\n    connectionLimit: {value: 100, maxRequestsPerConnection: 2}\n")
    async with running_gateway(tmp_path, app, policies_yaml=policy) as gw:
        host, port = next(iter(gw.addresses.values()))
        reader, writer, first = await _raw_get(host, port)
        assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
        _, _, second = await _raw_get(host, port, reader, writer)
        assert second.startswith(b"HTTP/1.1 200") and b"connection: close" in second.lower()
        assert await closed_within(reader, 2), "the connection stayed open after its last request"
        writer.close()


async def test_client_policy_max_requests_per_connection_holds_against_pipelining(app, tmp_path):
    """Three requests sent at once on a connection allowed two: two answers, the second with
    Connection: close, then the connection ends; the third is never answered."""
    policy = client_policy("  connection:\n    connectionLimit: {value: 100, maxRequestsPerConnection: 2}\n")
    async with running_gateway(tmp_path, app, policies_yaml=policy) as gw:
        host, port = next(iter(gw.addresses.values()))
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode() * 3)
        received = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
        assert received.count(b"HTTP/1.1 200") == 2, received[:300]
        assert received.lower().count(b"connection: close") == 1
        writer.close()


async def test_client_policy_max_connection_duration_closes_an_idle_connection(app, tmp_path):
    """connectionLimit.maxConnectionDuration: a kept-alive connection idle past it is closed; one
    busy at that time gets Connection: close on its next response."""
    policy = client_policy("  connection:\n    connectionLimit: {value: 100, maxConnectionDuration: 600ms}\n")
    async with running_gateway(tmp_path, app, policies_yaml=policy) as gw:
        host, port = next(iter(gw.addresses.values()))
        reader, writer, head = await _raw_get(host, port)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        assert not await closed_within(reader, 0.2), "closed before maxConnectionDuration"
        assert await closed_within(reader, 2), "an idle connection outlived maxConnectionDuration"
        writer.close()
        # Busy when the duration passes: the response in flight completes, then the connection closes.
        reader, writer, head = await _raw_get(host, port, extra="X-Echo-Delay: 1\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await closed_within(reader, 0.5), "a connection busy past maxConnectionDuration stayed open"
        writer.close()


async def test_client_policy_close_delay_holds_rejected_connections_without_counting_them(app, tmp_path):
    """connectionLimit {value: 1, closeDelay: 1s}: a connection over the limit gets no answer and
    is closed after about a second, not at once; while it is held, it does not count against the
    limit, so a connection made after the served one closed is served."""
    policy = client_policy("  connection:\n    connectionLimit: {value: 1, closeDelay: 1s}\n")
    async with running_gateway(tmp_path, app, policies_yaml=policy) as gw:
        host, port = next(iter(gw.addresses.values()))
        served_reader, served_writer, head = await _raw_get(host, port)
        assert head.startswith(b"HTTP/1.1 200")
        held_reader, held_writer = await asyncio.open_connection(host, port)
        held_writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        started = asyncio.get_running_loop().time()
        assert not await closed_within(held_reader, 0.4), "a rejected connection was closed before closeDelay"
        served_writer.close()
        await served_writer.wait_closed()
        await asyncio.sleep(0.1)
        _, writer, head = await _raw_get(host, port)  # the held one does not count
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        assert await closed_within(held_reader, 2), "a rejected connection was never closed"
        assert asyncio.get_running_loop().time() - started >= 0.9
        held_writer.close()


async def test_traffic_policy_request_timeout_gives_504(app, tmp_path):
    policy = traffic_policy("""  timeout:
    http: {requestTimeout: 300ms}
""")
    async with running_gateway(tmp_path, app, policies_yaml=policy) as gw, aiohttp.ClientSession() as session:
        assert (await get(session, gw, headers={"X-Echo-Delay": "1"}))[0] == 504
        assert (await get(session, gw))[0] == 200


def test_token_bucket_refills_at_the_configured_rate():
    limiter = LocalRateLimiter()
    rules = (RateLimitRule(requests=2, unit_seconds=60),)
    check = lambda now: limiter.check("p", rules, headers={}, client_ip=None, method="GET", now=now)  # noqa: E731
    assert check(0).allowed and check(0).allowed
    refused = check(0)
    assert not refused.allowed and refused.retry_after == 30
    assert not check(29).allowed
    assert check(30.5).allowed


def test_distinct_buckets_are_bounded_by_forgetting_the_oldest():
    limiter = LocalRateLimiter(max_buckets_per_rule=100)
    rules = (RateLimitRule(1, 3600, source=SourceSelector(ipaddress.ip_network("0.0.0.0/0"), distinct=True)),)

    def check(ip: str):
        return limiter.check("p", rules, headers={}, client_ip=ipaddress.ip_address(ip), method="GET", now=0)

    assert check("10.9.9.9").allowed and not check("10.9.9.9").allowed
    for i in range(10_000):
        check(f"10.0.{i // 256}.{i % 256}")
    # The flood pushed the first client's bucket out: memory stayed bounded, at the cost of
    # forgetting (never of refusing someone who was not limited).
    assert check("10.9.9.9").allowed
    assert not check("10.0.39.15").allowed  # a recent bucket is still remembered


SANDBOX_POLICY = """\
apiVersion: sandgate.dev/v1alpha1
kind: SandboxPolicy
metadata: {name: sandboxes, namespace: infra}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}]
  adminGroups: [platform-admins]
  preview:
    approval: manual
    maxPerSandbox: 3
    ports: {min: 3000, max: 9000}
"""


def test_sandbox_policy_loads_and_attaches(tmp_path):
    from gateway.config.loader import load_routes_from_string
    from gateway.policy.loader import load_policies

    config = load_routes_from_string(GATEWAY + backend("app", 1) + route_to("app"))
    (tmp_path / "sandbox.yaml").write_text(SANDBOX_POLICY)
    policies = load_policies(str(tmp_path), config)
    assert not policies.errors and not policies.problems
    policy = policies.sandbox_attached.for_rule("infra/app", 0, "infra/gw")
    assert policy.admin_groups == ("platform-admins",)
    assert (policy.preview_approval, policy.preview_max_per_sandbox, policy.preview_ports) == ("manual", 3, (3000, 9000))
    assert policy.owner_label == "sandgate.dev/owner"

    (tmp_path / "sandbox.yaml").write_text(SANDBOX_POLICY.replace("min: 3000", "min: 9500"))
    errors = load_policies(str(tmp_path), config).errors
    assert len(errors) == 1 and "ports.min 9500 is greater than ports.max 9000" in errors[0]
    assert errors[0].startswith(f"{tmp_path / 'sandbox.yaml'}:")


@pytest.mark.parametrize("spec, field", [
    ("  timeout:\n    http: {requestReceivedTimeout: 5s}\n", "timeout.http.requestReceivedTimeout"),
    ("  timeout:\n    tcp: {idleTimeout: 5s}\n", "timeout.tcp"),
    ("  tls: {minVersion: '1.3'}\n", "tls"),
    ("  headers: {preserveXRequestID: true}\n", "headers.preserveXRequestID"),
    ("  connection:\n    connectionLimit: {value: 5, maxStreamDuration: 5s}\n", "maxStreamDuration"),
    ("  connection: {socketBufferLimit: 1Mi}\n", "connection.socketBufferLimit"),
    ("  clientIPDetection:\n    customHeader: {name: X-Real-IP}\n", "clientIPDetection.customHeader"),
])
def test_client_policy_fields_this_build_does_not_apply_are_refused(tmp_path, spec, field):
    """A ClientTrafficPolicy setting Sandgate does not apply is an error naming it (file and
    line), as for the other kinds: a user's policy must not load as if it were enforced."""
    from gateway.config.loader import load_routes_from_string
    from gateway.policy.loader import load_policies

    config = load_routes_from_string(GATEWAY + backend("app", 1) + route_to("app"))
    (tmp_path / "client.yaml").write_text(client_policy(spec))
    errors = load_policies(str(tmp_path), config).errors
    assert len(errors) == 1 and f"{field} is not supported by this build" in errors[0], errors
    assert errors[0].startswith(f"{tmp_path / 'client.yaml'}:")
    (tmp_path / "client.yaml").write_text(client_policy("  connection:\n    connectionLimit: {value: 5, closeDelay: 1s}\n"))
    assert load_policies(str(tmp_path), config).errors == []


@pytest.mark.parametrize(
    "cookie",
    ['session="unterminated', "a=b; ; ;=; session", "\x7f\x00=\x01", "session=" + "x" * 20_000, 'a="b\\"; session=tok'],
)
def test_hostile_cookie_headers_never_break_token_extraction(cookie):
    """A token read from a cookie: a malformed Cookie header yields no token, never an error."""
    from multidict import CIMultiDict

    from gateway.policy.decision import RequestFacts, extract_api_key, extract_token
    from gateway.policy.model import ApiKeyAuth, JwtProvider, TokenSource

    provider = JwtProvider("p", None, (), None, "{}", 300.0, (), TokenSource(headers=(), cookies=("session",)))
    facts = RequestFacts("GET", "/", "", CIMultiDict({"Cookie": cookie}), "127.0.0.1")
    token = extract_token((provider,), facts)
    assert token is None or isinstance(token, str)
    assert extract_api_key(ApiKeyAuth(cookies=("session",)), facts) == token
    good = RequestFacts("GET", "/", "", CIMultiDict({"Cookie": "other=1; session=abc"}), "127.0.0.1")
    assert extract_token((provider,), good) == "abc"


# --- state keyed by client input stays bounded ----------------------------------------------------

DISTINCT_USER_LIMIT = """  rateLimit:
    type: Local
    local:
      rules:
      - clientSelectors:
        - headers: [{{name: X-User, type: Distinct}}]
        limit: {{requests: {requests}, unit: Hour}}
"""


async def gauge(gw, name: str) -> float:
    from tests.support.policy_harness import metric_value

    return await metric_value(gw, name)


async def test_a_flood_of_long_distinct_values_keeps_rate_limit_buckets_bounded_by_bytes_and_count(app, tmp_path):
    """Distinct header values are the client's: 15 KiB each (under the 16 KiB header line
    limit), hundreds of them. The buckets' keys are kept as fixed-size digests (bytes bounded),
    their number stays under the cap (count bounded), and the limit still holds for a value that
    is being used. (The echo upstream itself refuses such long lines: only the gateway's
    limiter is under test here.)"""
    policy = traffic_policy(DISTINCT_USER_LIMIT.format(requests=1))
    value_bytes, flood = 15 * 1024, 300
    async with running_gateway(tmp_path, app, policies_yaml=policy) as gw, aiohttp.ClientSession() as session:
        for i in range(flood):
            status = (await get(session, gw, headers={"X-User": f"{i:06d}" + "v" * value_bytes}))[0]
            assert status not in (429, 431), status
        assert await gauge(gw, "sandgate_ratelimit_buckets") == flood
        held = await gauge(gw, "sandgate_ratelimit_key_bytes")
        assert 0 < held <= flood * 64, f"{held} characters of keys held for {flood} values of {value_bytes} bytes"

        # The count: a gateway whose limiter keeps at most 50 buckets per rule.
        gw.gateway.rate_limiter = LocalRateLimiter(max_buckets_per_rule=50)
        for i in range(flood):
            await get(session, gw, headers={"X-User": f"u{i}" + "w" * 1000})
        assert await gauge(gw, "sandgate_ratelimit_buckets") == 50
        assert await gauge(gw, "sandgate_ratelimit_key_bytes") <= 50 * 64
        recent = {"X-User": f"u{flood - 1}" + "w" * 1000}
        assert (await get(session, gw, headers=recent))[0] == 429  # a recent bucket is remembered


async def test_a_reload_drops_the_rate_limit_buckets_of_the_old_revision(app, tmp_path):
    async with running_gateway(tmp_path, app, policies_yaml=traffic_policy(DISTINCT_USER_LIMIT.format(requests=1)),
                               reload_interval=0.1) as gw, aiohttp.ClientSession() as session:
        for user in ("a", "b", "c", "d"):
            assert (await get(session, gw, headers={"X-User": user}))[0] == 200
        assert (await get(session, gw, headers={"X-User": "a"}))[0] == 429
        assert await gauge(gw, "sandgate_ratelimit_buckets") == 4

        (tmp_path / "policies" / "policies.yaml").write_text(traffic_policy(DISTINCT_USER_LIMIT.format(requests=2)))

        async def reloaded():
            status, headers, _ = await get(session, gw, headers={"X-User": "e"})
            return headers.get("X-RateLimit-Limit") == "2"

        from tests.support.policy_harness import wait_for

        assert await wait_for(reloaded, timeout=10)
        assert await gauge(gw, "sandgate_ratelimit_buckets") == 1  # only "e", of the new revision
        assert (await get(session, gw, headers={"X-User": "a"}))[0] == 200  # a new revision, a new bucket


async def test_rate_limit_distinct_per_claim_counts_per_issuer_and_subject(tmp_path, upstream, issuer):
    """claimToHeaders `sub` -> X-User and a Distinct limit on X-User: "alice" of issuer A and
    "alice" of issuer B are two callers with a bucket each."""
    from tests.support.issuer import claims
    from tests.support.policy_harness import provider, security_policy, wait_ready

    issuers = ("https://a.example.test", "https://b.example.test")
    providers = [provider(issuer, name=f"idp-{i}", audiences=["api"], claimToHeaders=[{"claim": "sub", "header": "X-User"}])
                 | {"issuer": iss} for i, iss in enumerate(issuers)]
    policies = security_policy("jwt", {"jwt": {"providers": providers}}, targets=[
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "app"}]) + traffic_policy(
        DISTINCT_USER_LIMIT.format(requests=1))
    routes = GATEWAY + backend("app", upstream.port) + route_to("app")
    async with running_gateway(tmp_path, routes, policies_yaml=policies) as gw, aiohttp.ClientSession() as session:
        assert await wait_ready(gw)
        alice = [issuer.mint(claims(iss=iss, sub="alice", aud="api")) for iss in issuers]
        bearer = [{"Authorization": f"Bearer {token}"} for token in alice]
        assert (await get(session, gw, headers=bearer[0]))[0] == 200
        assert (await get(session, gw, headers=bearer[0]))[0] == 429
        assert (await get(session, gw, headers=bearer[1]))[0] == 200  # another issuer's alice
        assert (await get(session, gw, headers=bearer[1]))[0] == 429
        # A client-sent X-User never picks the bucket: claimToHeaders replaces it.
        assert (await get(session, gw, headers={**bearer[1], "X-User": "mallory"}))[0] == 429


class _KeepAliveServer(asyncio.Protocol):
    """A minimal HTTP/1.1 upstream that keeps connections open; `open` holds the live ones."""

    def __init__(self, open_connections: set):
        self.open = open_connections
        self.buffer = b""

    def connection_made(self, transport):
        self.transport = transport
        self.open.add(transport)

    def connection_lost(self, exc):
        self.open.discard(self.transport)

    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def test_upstream_pools_and_idle_connections_stay_bounded_across_many_addresses(tmp_path):
    """Sandbox and preview targets are many distinct (address, port) pairs. With at most 4
    pools, 2 idle connections per pool and 5 in all, traffic to 12 addresses leaves at most 5
    kept-alive connections open at the upstreams, and every request is still answered."""
    from gateway.proxy.upstream import UpstreamPool
    from tests.support.harness import free_port
    from tests.support.policy_harness import metric_value, prefix_route

    loop = asyncio.get_running_loop()
    open_connections: set = set()
    port = free_port()
    addresses = [f"127.0.0.{i}" for i in range(2, 14)]
    servers = [await loop.create_server(lambda: _KeepAliveServer(open_connections), address, port)
               for address in addresses]
    routes = GATEWAY
    for i, address in enumerate(addresses):
        routes += f"""\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: b{i}, namespace: infra}}
spec:
  endpoints:
  - ip: {{address: {address}, port: {port}}}
""" + prefix_route(f"r{i}", f"/b{i}", f"b{i}")
    try:
        async with running_gateway(tmp_path, routes) as gw:
            await gw.gateway.pool.close()
            gw.gateway.pool = UpstreamPool(max_pools=4, max_idle_per_pool=2, max_idle=5)
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    for i in range(len(addresses)):
                        # 3 at once: each needs a connection of its own, then all go idle
                        results = await asyncio.gather(*(get(session, gw, f"/b{i}/x") for _ in range(3)))
                        assert [r[0] for r in results] == [200, 200, 200]
                assert await metric_value(gw, "sandgate_upstream_pools") <= 4
                assert await metric_value(gw, "sandgate_upstream_idle_connections") <= 5

                async def settled():
                    return len(open_connections) <= 5

                from tests.support.policy_harness import wait_for

                assert await wait_for(settled, timeout=5), f"{len(open_connections)} upstream connections kept open"
                assert (await get(session, gw, "/b0/again"))[0] == 200  # an evicted pool comes back
    finally:
        for server in servers:
            server.close()
