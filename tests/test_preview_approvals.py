"""The approval gate (SPEC §5): manual mode returns 202, a long poll on one replica is woken by a
decision on another through PostgreSQL notifications, denials and lapsed requests."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import pytest

from gateway.server.handler import Settings
from tests.support.fixtures import issuer, world  # noqa: F401 - fixtures
from tests.support.harness import running_gateway
from tests.support.issuer import claims
from tests.support.policy_harness import wait_for
from tests.support.postgres import fresh_database
from tests.support.previews import api, host_of, preview_gateway, preview_policies, preview_routes, via_host


LOOPBACK = Settings(allow_loopback_sandboxes=True)


def replica(tmp_path, name, world, issuer, database_url=None, routes=None):
    directory = tmp_path / name
    directory.mkdir()
    return running_gateway(directory, routes or preview_routes(), settings=LOOPBACK, kubeconfig=world.api.kubeconfig,
                           policies_yaml=preview_policies(issuer, approval="manual"), database_url=database_url)


def user(issuer, sub, *groups):
    return issuer.mint(claims(sub=sub, groups=list(groups)))


async def test_approval_on_one_replica_wakes_the_waiter_on_the_other(tmp_path, world, issuer):
    agent, alice = user(issuer, "agent-7"), user(issuer, "alice@example.com")
    # the agent may ask because the sandbox is shared with it; only the owner (or an admin) decides
    _, port = await world.add("agents", "box-2", owner="alice@example.com", shared_with="agent-7")
    async with fresh_database() as database_url, \
            replica(tmp_path, "one", world, issuer, database_url) as one, \
            replica(tmp_path, "two", world, issuer, database_url) as two:
        status, pending = await api(one, "POST", "/gateway/v1/previews", agent, {"namespace": "agents", "sandbox": "box-2", "port": port})
        assert status == 202, pending
        assert pending["status"] == "pending" and pending["poll"].endswith(f"/gateway/v1/approvals/{pending['approval_id']}?wait=30s")
        approval = f"/gateway/v1/approvals/{pending['approval_id']}"

        listed = await api(two, "GET", "/gateway/v1/approvals?status=pending", alice)
        assert [a["approval_id"] for a in listed[1]["approvals"]] == [pending["approval_id"]]
        shared_may_not_decide = await api(two, "POST", approval, agent, {"decision": "approve"})
        assert shared_may_not_decide[0] == 403

        started = time.monotonic()
        waiter = asyncio.create_task(api(one, "GET", approval + "?wait=20s", agent))
        await asyncio.sleep(0.5)
        assert not waiter.done()
        decided = await api(two, "POST", approval, alice, {"decision": "approve"})
        status, result = await asyncio.wait_for(waiter, 5)
        woke_after = time.monotonic() - started
        again = await api(two, "POST", approval, alice, {"decision": "deny"})
        served = await via_host(two, host_of(result["preview"]))
    assert decided[0] == 200 and decided[1]["status"] == "approved"
    assert status == 200 and result["status"] == "approved" and result["decided_by"] == "alice@example.com"
    assert woke_after < 2.0  # woken by the notification, not by the end of the wait
    assert again[0] == 409
    assert served[0] == 200 and served[2]["backend"] == "agents/box-2"


async def test_denied_and_lapsed_requests(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice, admin = user(issuer, "alice@example.com"), user(issuer, "root", "platform-admins")
    async with replica(tmp_path, "one", world, issuer, routes=preview_routes(approval_window="1s")) as gw:
        _, first = await api(gw, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port})
        denied = await api(gw, "POST", f"/gateway/v1/approvals/{first['approval_id']}", admin, {"decision": "deny"})
        _, second = await api(gw, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port})
        lapsed = await api(gw, "GET", f"/gateway/v1/approvals/{second['approval_id']}?wait=5s", alice)
        stranger = await api(gw, "GET", f"/gateway/v1/approvals/{second['approval_id']}", user(issuer, "mallory"))
        late = await api(gw, "POST", f"/gateway/v1/approvals/{second['approval_id']}", alice, {"decision": "approve"})
        routes = world.api.list("gateway.networking.k8s.io/v1", "HTTPRoute", "agents")

        async def audited():
            kinds = {r.kind for r in await gw.store.list_audit(limit=50)}
            return {"preview.requested", "preview.denied", "preview.approval_expired"} <= kinds

        assert await wait_for(audited, timeout=5)
    assert denied[0] == 200 and denied[1]["status"] == "denied"
    assert lapsed[0] == 200 and lapsed[1]["status"] == "expired"
    assert stranger[0] == 404
    assert late[0] == 409
    assert routes == []


async def test_hostile_api_input_gets_clear_errors_and_changes_nothing(tmp_path, world, issuer):
    import aiohttp

    from tests.support.harness import url

    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice = user(issuer, "alice@example.com")
    auth = {"Authorization": f"Bearer {alice}"}
    async with replica(tmp_path, "one", world, issuer) as gw:
        _, pending = await api(gw, "POST", "/gateway/v1/previews", alice, {"namespace": "agents", "sandbox": "box-1", "port": port})
        approval = f"/gateway/v1/approvals/{pending['approval_id']}"
        async with aiohttp.ClientSession() as session:
            async def raw(method, path, data=None):
                async with session.request(method, url(gw, path), headers=auth, data=data) as response:
                    return response.status, await response.json()

            cases = [
                (("POST", "/gateway/v1/previews", b"x" * 20_000), 413),
                (("POST", "/gateway/v1/previews", b"{not json"), 400),
                (("POST", "/gateway/v1/previews", b"[1, 2]"), 400),
                (("POST", "/gateway/v1/previews", b'{"namespace": "agents", "sandbox": "box-1", "port": true}'), 400),
                (("POST", "/gateway/v1/previews", b'{"namespace": "agents", "sandbox": "box-1", "port": 70000}'), 400),
                (("POST", "/gateway/v1/previews", b'{"namespace": "agents", "sandbox": "box-1\\n", "port": 80}'), 400),
                (("POST", approval, b'{"decision": "maybe"}'), 400),
                (("POST", approval, b"\xff\xfe"), 400),
                (("GET", approval + "?wait=forever", None), 400),
                (("GET", "/gateway/v1/approvals/..%2F..%2Fetc", None), 404),
                (("GET", "/gateway/v1/approvals/" + "A" * 32, None), 404),
                (("GET", "/gateway/v1/previews/" + "z" * 200, None), 404),
                (("DELETE", "/gateway/v1/previews/../approvals", None), 404),
            ]
            for (method, path, data), status in cases:
                got, body = await raw(method, path, data)
                assert got == status, (method, path, data, body)
                assert body["error"] and body["message"] and body["request_id"]
        still = await api(gw, "GET", approval, alice)
    assert still[1]["status"] == "pending"
    assert world.api.list("v1", "Service", "agents") == []


def manual(tmp_path, world, issuer, database_url=None, routes=None, **preview_fields):
    return preview_gateway(tmp_path, world, issuer, routes=routes, database_url=database_url, approval="manual",
                           **preview_fields)


async def test_pending_requests_are_capped_per_requester_and_per_sandbox_under_parallel_requests(tmp_path, world, issuer):
    sharers = [f"agent-{i}" for i in range(4)]
    _, port = await world.add("agents", "box-1", owner="alice@example.com", shared_with=",".join(sharers))
    body = {"namespace": "agents", "sandbox": "box-1", "port": port}
    async with fresh_database() as database_url, \
            manual(tmp_path, world, issuer, database_url, maxPendingPerSandbox=5, maxPendingPerRequester=2) as gw:
        tokens = {who: user(issuer, who) for who in sharers}
        results = await asyncio.gather(*(api(gw, "POST", "/gateway/v1/previews", tokens[who], body)
                                         for who in sharers * 6))
        pending = await gw.store.list_approvals("pending")
    accepted = [who for who, (status, _) in zip(sharers * 6, results) if status == 202]
    refused = [b for s, b in results if s != 202]
    assert len(accepted) == 5 and max(accepted.count(who) for who in sharers) == 2
    assert len(refused) == 19 and {b["error"] for b in refused} == {"approval_limit"}
    assert len(pending) == 5


@pytest.mark.parametrize("database", ["embedded", "postgres"])
async def test_decided_and_lapsed_requests_are_pruned_and_lapsed_ones_free_their_place(tmp_path, world, issuer, database):
    _, port = await world.add("agents", "box-1", owner="alice@example.com", shared_with="agent-7")
    agent, alice = user(issuer, "agent-7"), user(issuer, "alice@example.com")
    body = {"namespace": "agents", "sandbox": "box-1", "port": port}
    async with AsyncExitStack() as stack:
        database_url = await stack.enter_async_context(fresh_database()) if database == "postgres" else None
        gw = await stack.enter_async_context(manual(
            tmp_path, world, issuer, database_url, routes=preview_routes(approval_window="3s"), maxPendingPerRequester=2))
        first = await api(gw, "POST", "/gateway/v1/previews", agent, body)
        second = await api(gw, "POST", "/gateway/v1/previews", agent, body)
        third = await api(gw, "POST", "/gateway/v1/previews", agent, body)
        await api(gw, "POST", f"/gateway/v1/approvals/{first[1]['approval_id']}", alice, {"decision": "deny"})
        await asyncio.sleep(3.2)  # the second request lapses unread
        after_lapse = await api(gw, "POST", "/gateway/v1/previews", agent, body)
        approvals = gw.cluster.approvals
        kept_by_retention = await approvals.prune_once()  # default retention: a day
        approvals.retention = 0.5
        await asyncio.sleep(0.6)
        pruned = await approvals.prune_once()
        left = await gw.store.list_approvals()
    assert (first[0], second[0], third[0], after_lapse[0]) == (202, 202, 429, 202)
    assert kept_by_retention == 0
    assert pruned == 2
    assert [a.id for a in left] == [after_lapse[1]["approval_id"]]


async def test_requesters_approve_their_own_request_only_when_the_policy_allows(tmp_path, world, issuer):
    _, port = await world.add("agents", "box-1", owner="alice@example.com")
    alice, admin = user(issuer, "alice@example.com"), user(issuer, "root", "platform-admins")
    body = {"namespace": "agents", "sandbox": "box-1", "port": port}
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    async with manual(tmp_path / "off", world, issuer) as gw:
        _, asked = await api(gw, "POST", "/gateway/v1/previews", alice, body)
        refused = await api(gw, "POST", f"/gateway/v1/approvals/{asked['approval_id']}", alice, {"decision": "approve"})
        by_admin = await api(gw, "POST", f"/gateway/v1/approvals/{asked['approval_id']}", admin, {"decision": "approve"})
        _, withdrawn = await api(gw, "POST", "/gateway/v1/previews", alice, body)
        withdraw = await api(gw, "POST", f"/gateway/v1/approvals/{withdrawn['approval_id']}", alice, {"decision": "deny"})
    async with manual(tmp_path / "on", world, issuer, selfApproval=True) as gw:
        _, asked = await api(gw, "POST", "/gateway/v1/previews", alice, body)
        allowed = await api(gw, "POST", f"/gateway/v1/approvals/{asked['approval_id']}", alice, {"decision": "approve"})
    assert refused[0] == 403 and refused[1]["error"] == "policy_violation"
    assert [v["code"] for v in refused[1]["violations"]] == ["self-approval-not-allowed"]
    assert by_admin[0] == 200 and by_admin[1]["status"] == "approved" and by_admin[1]["decided_by"] == "root"
    assert withdraw[0] == 200 and withdraw[1]["status"] == "denied"
    assert allowed[0] == 200 and allowed[1]["status"] == "approved" and allowed[1]["preview"]["token"]
