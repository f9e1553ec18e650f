"""gateway.kube against the Kubernetes API double: the watched copy follows changes, survives the
API server going away, and lists again when its resourceVersion is too old (410 Gone)."""

from __future__ import annotations

import pytest

from gateway.kube import SANDBOX, KubeClient, KubeError, WatchedKind
from tests.support.fixtures import world  # noqa: F401 - fixture
from tests.support.policy_harness import wait_for
from tests.support.sandboxes import SANDBOX_API, sandbox_object


async def watched(world, events=None):
    kube = await KubeClient.connect(str(world.api.kubeconfig))
    copy = WatchedKind(kube, SANDBOX, "agents", on_change=(lambda kind, obj: events.append((kind, obj["metadata"]["name"])))
                       if events is not None else None)
    copy.start()
    return kube, copy


async def test_the_copy_follows_creates_updates_and_deletes(world):
    world.api.create(sandbox_object("agents", "one"))
    events = []
    kube, copy = await watched(world, events)
    try:
        await copy.synced.wait()
        assert set(copy.objects) == {"one"}
        world.api.create(sandbox_object("agents", "two"))
        world.api.set_status(SANDBOX_API, "Sandbox", "agents", "two", {"podIPs": ["10.0.0.7"]})
        world.api.delete(SANDBOX_API, "Sandbox", "agents", "one")

        async def caught_up():
            return set(copy.objects) == {"two"} and copy.objects["two"].get("status", {}).get("podIPs") == ["10.0.0.7"]

        assert await wait_for(caught_up)
        assert ("DELETED", "one") in events and ("ADDED", "two") in events and ("MODIFIED", "two") in events
    finally:
        await copy.stop()
        await kube.close()


async def test_a_too_old_resource_version_lists_again_and_the_copy_stays_right(world):
    world.api.create(sandbox_object("agents", "old"))
    events = []
    kube, copy = await watched(world, events)
    try:
        await copy.synced.wait()
        await world.api.stop()
        # while the API server is away: the copy keeps serving what it had
        world.api.create(sandbox_object("agents", "new"))
        world.api.delete(SANDBOX_API, "Sandbox", "agents", "old")
        world.api.compact()  # the copy's resourceVersion is now too old: 410 on resume
        assert set(copy.objects) == {"old"}
        await world.api.start()

        async def relisted():
            return set(copy.objects) == {"new"}

        assert await wait_for(relisted, timeout=15)
        assert copy.relists >= 2 and copy.connected
        assert ("DELETED", "old") in events and ("ADDED", "new") in events
        assert any("watch" not in path and "/sandboxes" in path for method, path in world.api.requests[-20:] if method == "GET")
    finally:
        await copy.stop()
        await kube.close()


async def test_calls_name_the_api_server_refusal(world):
    kube = await KubeClient.connect(str(world.api.kubeconfig))
    try:
        assert await kube.get(SANDBOX, "agents", "missing") is None
        created = await kube.create(SANDBOX, "agents", sandbox_object("agents", "box"))
        with pytest.raises(KubeError) as refused:
            await kube.create(SANDBOX, "agents", sandbox_object("agents", "box"))
        assert refused.value.status == 409 and refused.value.reason == "AlreadyExists" and refused.value.conflict
        patched = await kube.merge_patch(SANDBOX, "agents", "box", {"metadata": {"annotations": {"a": "b"}}})
        assert patched["metadata"]["annotations"] == {"a": "b"}
        assert not await kube.delete(SANDBOX, "agents", "box", uid="not-its-uid")  # precondition: not deleted
        assert await kube.delete(SANDBOX, "agents", "box", uid=created["metadata"]["uid"])
        assert not await kube.delete(SANDBOX, "agents", "box")  # already gone
    finally:
        await kube.close()


async def test_an_unreadable_kubeconfig_is_one_clear_error(tmp_path):
    with pytest.raises(KubeError) as refused:
        await KubeClient.connect(str(tmp_path / "nope"))
    assert refused.value.reason == "NoConfiguration" and str(tmp_path / "nope") in refused.value.message
