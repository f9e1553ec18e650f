"""Every case of conformance/httproute_cases.yaml, through a running gateway to real upstreams.

The case file's routes are used as written (Service backendRefs); each logical backend is a real
echo server, reached through the same address overrides `sandgate dev` uses. The runner follows
the file's conventions, so cases added to the file are exercised without new code.
"""

from __future__ import annotations

import asyncio
import collections
import copy
from pathlib import Path

import aiohttp
import pytest
import yaml
from yarl import URL

from tests.support.harness import running_gateway

CASES_FILE = Path(__file__).parent / "conformance" / "httproute_cases.yaml"
DATA = yaml.safe_load(CASES_FILE.read_text())
DEFAULT_NAMESPACE = "infra"


def _cases():
    for group in DATA["groups"]:
        for case in group["cases"]:
            yield pytest.param(group, case, id=f"{group['id']}/{case['id']}")


def _routes_yaml(group: dict, case: dict) -> tuple[str, set[tuple[str, str, int]]]:
    gateway = group.get("gateway") or DATA["default_gateway"]
    docs = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": DEFAULT_NAMESPACE},
            "spec": {"gatewayClassName": "sandgate", "listeners": [
                {**listener, "allowedRoutes": {"namespaces": {"from": "All"}}} for listener in gateway["listeners"]
            ]},
        }
    ]
    backends: set[tuple[str, str, int]] = set()
    routes = copy.deepcopy(group["routes"])
    override = case.get("route_override")
    if override:
        target = next((r for r in routes if r["name"] == override.get("name")), routes[0])
        target.update({k: v for k, v in override.items() if k != "name"})
    for route in routes:
        namespace = route.get("namespace", DEFAULT_NAMESPACE)
        spec = {"parentRefs": route.get("parentRefs") or [{"name": "gw", "namespace": DEFAULT_NAMESPACE}]}
        for ref in spec["parentRefs"]:
            ref.setdefault("namespace", DEFAULT_NAMESPACE)
        if route.get("hostnames"):
            spec["hostnames"] = route["hostnames"]
        rules = copy.deepcopy(route.get("rules") or [])
        for rule in rules:
            rule.pop("note", None)
            for ref in rule.get("backendRefs") or []:
                ref.setdefault("port", 8080)
                backends.add((ref["name"], ref.get("namespace", namespace), ref["port"]))
        spec["rules"] = rules
        metadata = {"name": route["name"], "namespace": namespace}
        if route.get("created"):
            metadata["creationTimestamp"] = route["created"]
        docs.append({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": metadata, "spec": spec})
    return yaml.safe_dump_all(docs, sort_keys=False), backends


def _joined(headers, name: str) -> str | None:
    values = [v for k, v in headers if k.lower() == name.lower()]
    return ",".join(values) if values else None


@pytest.mark.parametrize("group,case", list(_cases()))
async def test_conformance_case(group, case, echo_servers, tmp_path):
    routes_yaml, backends = _routes_yaml(group, case)
    servers = await echo_servers(*sorted({name for name, _, _ in backends}))
    overrides = {f"{name}.{ns}.svc.cluster.local:{port}": servers[name] for name, ns, port in backends}
    gateway = group.get("gateway") or DATA["default_gateway"]
    listen = [f"{listener['name']}=127.0.0.1:0" for listener in gateway["listeners"]]
    req = {**DATA["default_request"], **case["req"]}
    expect = case["expect"]

    async with running_gateway(tmp_path, routes_yaml, overrides=overrides, listen=listen) as gw:
        port = req.get("port", gateway["listeners"][0]["port"])
        listener = next(l["name"] for l in gateway["listeners"] if l["port"] == port)
        address = gw.addresses[listener]
        target = URL(f"http://{address[0]}:{address[1]}{req.get('path', '/')}", encoded=True)
        headers = {"Host": req["host"], **(req.get("headers") or {})}
        if "backend_delay" in req:
            headers["X-Echo-Delay"] = str(float(req["backend_delay"].rstrip("s")))
        for name, value in (expect.get("backend_sets") or {}).items():
            headers.setdefault("X-Echo-Set", f"{name}: {value}")

        async with aiohttp.ClientSession(auto_decompress=False) as session:
            if headers.get("Upgrade", "").lower() == "websocket":
                await _check_websocket(session, target, req, expect)
                return
            repeat = case.get("repeat", 1)
            seen = collections.Counter()
            for _ in range(repeat):
                async with session.request(req["method"], target, headers=headers, allow_redirects=False) as resp:
                    body = await resp.read()
                    status = resp.status
                    expected_status = expect.get("status", 200)
                    assert status == expected_status, body
                    if "location" in expect:
                        assert _same_location(resp.headers["Location"], expect["location"])
                    _check_response_headers(resp.headers, expect.get("response") or {})
                    if status != 200 or "backend" not in expect and "distribution" not in expect and "invariant" not in expect:
                        continue
                    echo = await resp.json(content_type=None)
                    seen[echo["backend"]] += 1
                    if "backend" in expect:
                        assert echo["backend"] == expect["backend"]
                    _check_upstream(echo, expect.get("upstream") or {})
                    if "invariant" in expect and "upstream header Backend" in expect["invariant"]:
                        values = [v for k, v in echo["headers"] if k.lower() == "backend"]
                        assert values == [echo["backend"]]
            if "distribution" in expect:
                tolerance = expect.get("tolerance", 0.05)
                for name, share in expect["distribution"].items():
                    assert abs(seen[name] / repeat - share) <= tolerance, (name, seen)


def _same_location(actual: str, expected: str) -> bool:
    if actual == expected:
        return True
    # An explicit default port is tolerated (":80" for http, ":443" for https).
    a, e = URL(actual), URL(expected)
    return (a.scheme, a.host, a.port, a.raw_path_qs) == (e.scheme, e.host, e.port, e.raw_path_qs)


def _check_upstream(echo: dict, expected: dict) -> None:
    if "path" in expected:
        assert echo["path"] == expected["path"]
    if "host" in expected:
        assert _joined(echo["headers"], "Host") == expected["host"]
    for name, value in (expected.get("headers") or {}).items():
        assert _joined(echo["headers"], name) == value, name
    for name in expected.get("absent_headers") or []:
        assert _joined(echo["headers"], name) is None, name


def _check_response_headers(headers, expected: dict) -> None:
    for name, value in (expected.get("headers") or {}).items():
        assert ",".join(headers.getall(name, [])) == value, name
    for name in expected.get("absent_headers") or []:
        assert name not in headers, name


async def _check_websocket(session, target, req, expect) -> None:
    url = target.with_path("/ws") if target.path in ("", "/") else target
    async with session.ws_connect(url, headers={"Host": req["host"]}) as ws:
        hello = await asyncio.wait_for(ws.receive_json(), 5)
        if "backend" in expect:
            assert hello["backend"] == expect["backend"]
        await ws.send_str("text frame")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "text frame"
        payload = bytes(range(256))
        await ws.send_bytes(payload)
        assert (await asyncio.wait_for(ws.receive(), 5)).data == payload
