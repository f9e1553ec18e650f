"""The Kubernetes API double rejects what a real API server rejects and answers as one does.

Everything goes through the real kubernetes-asyncio client, except where the point is the raw
HTTP shape (exact Status bodies, Warning headers, watch lines, WebSocket subprotocols).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.stream import WsApiClient

from tests.support.kubeapi import ApiError, running_kube_api
from tests.support.kubeapi import schema as schema_rules

# Where the CustomObjectsApi calls below go: these resources in the "default" namespace.
SANDBOXES = {"group": "agents.x-k8s.io", "version": "v1beta1", "namespace": "default", "plural": "sandboxes"}
ROUTES = {"group": "gateway.networking.k8s.io", "version": "v1", "namespace": "default", "plural": "httproutes"}
MERGE = "application/merge-patch+json"


# ----- objects


def sandbox(name: str, *, labels: dict | None = None, owners: list | None = None, **spec) -> dict:
    pod_spec = {"containers": [{"name": "main", "image": "python:3.12"}]}
    metadata = {"name": name, "labels": labels or {}, **({"ownerReferences": owners} if owners else {})}
    return {
        "apiVersion": "agents.x-k8s.io/v1beta1",
        "kind": "Sandbox",
        "metadata": metadata,
        "spec": {"podTemplate": {"spec": pod_spec}, **spec},
    }


def route(name: str, *, owners: list | None = None, **spec) -> dict:
    metadata = {"name": name, **({"ownerReferences": owners} if owners else {})}
    spec = spec or {"parentRefs": [{"name": "edge"}], "hostnames": ["box.example.test"]}
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": metadata, "spec": spec}


def service(
    name: str, *, namespace: str = "default", labels: dict | None = None, owners: list | None = None, **spec
) -> dict:
    metadata = {"name": name, "namespace": namespace, "labels": labels or {}}
    if owners:
        metadata["ownerReferences"] = owners
    spec = {"ports": [{"port": 80, "targetPort": 8080}], **spec}
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


def pod(name: str, **container) -> dict:
    container = {"name": "main", "image": "python:3.12", **container}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [container]}}


def owner_reference(obj: dict) -> dict:
    metadata = obj["metadata"]
    reference = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": metadata["name"]}
    return {**reference, "uid": metadata["uid"], "controller": True}


def status_body(error: ApiException) -> dict:
    return json.loads(error.body)


def causes(error: ApiException) -> dict[str, str]:
    return {cause["field"]: cause["reason"] for cause in status_body(error)["details"]["causes"]}


# ----- fixtures


@pytest.fixture
async def api(tmp_path):
    async with running_kube_api(tmp_path, bookmark_interval=0.2) as api:
        yield api


@pytest.fixture
async def k8s(api):
    async with await api.client() as api_client:
        yield api_client


@pytest.fixture
def core(k8s):
    return client.CoreV1Api(k8s)


@pytest.fixture
def custom(k8s):
    return client.CustomObjectsApi(k8s)


@pytest.fixture
async def http(api):
    """Raw HTTP with the token, for the exact shapes."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api.token}"}) as session:
        yield session


@pytest.fixture
async def ws_core(api):
    async with await api.ws_client() as ws_client:
        yield client.CoreV1Api(ws_client)


# ----- create / get / list / replace / delete


async def test_service_round_trip_with_server_defaults(core):
    created = await core.create_namespaced_service("default", service("web", selector={"app": "web"}))
    assert created.spec.type == "ClusterIP"
    assert re.fullmatch(r"10\.(9[6-9]|10[0-9]|11[01])\.\d+\.\d+", created.spec.cluster_ip)
    assert created.spec.cluster_ips == [created.spec.cluster_ip]
    assert created.spec.ports[0].protocol == "TCP"
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.generation is None  # Services have no generation, as on a real server

    fetched = await core.read_namespaced_service("web", "default")
    assert fetched.metadata.resource_version == created.metadata.resource_version
    fetched.spec.selector = {"app": "web2"}
    replaced = await core.replace_namespaced_service("web", "default", fetched)
    assert replaced.spec.selector == {"app": "web2"}
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)

    listed = await core.list_namespaced_service("default")
    assert [s.metadata.name for s in listed.items] == ["web"]
    assert listed.metadata.resource_version == replaced.metadata.resource_version

    gone = await core.delete_namespaced_service("web", "default")
    assert gone.metadata.name == "web"  # core types answer a DELETE with the object
    with pytest.raises(ApiException) as caught:
        await core.read_namespaced_service("web", "default")
    assert caught.value.status == 404


async def test_pod_defaults_status_reset_and_immutable_spec(core):
    body = pod("box")
    body["status"] = {"phase": "Running"}  # a client cannot set status on create
    created = await core.create_namespaced_pod("default", body)
    assert created.status.phase == "Pending"
    assert created.spec.restart_policy == "Always"
    assert created.spec.containers[0].image_pull_policy == "IfNotPresent"
    assert created.metadata.generation == 1

    created.spec.containers[0].image = "python:3.13"
    updated = await core.replace_namespaced_pod("box", "default", created)
    assert updated.spec.containers[0].image == "python:3.13"

    updated.spec.containers[0].name = "renamed"
    with pytest.raises(ApiException) as caught:
        await core.replace_namespaced_pod("box", "default", updated)
    assert caught.value.status == 422
    assert causes(caught.value) == {"spec": "FieldValueForbidden"}

    gone = await core.delete_namespaced_pod("box", "default")
    assert gone.metadata.name == "box"


async def test_sandbox_round_trip_with_schema_defaults(custom):
    created = await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box"))
    assert created["spec"]["operatingMode"] == "Running"  # schema defaults
    assert created["spec"]["shutdownPolicy"] == "Retain"
    assert created["metadata"]["generation"] == 1
    assert "status" not in created

    fetched = await custom.get_namespaced_custom_object(**SANDBOXES, name="box")
    fetched["spec"]["operatingMode"] = "Suspended"
    replaced = await custom.replace_namespaced_custom_object(**SANDBOXES, name="box", body=fetched)
    assert replaced["spec"]["operatingMode"] == "Suspended"
    assert replaced["metadata"]["generation"] == 2

    listed = await custom.list_cluster_custom_object(group="agents.x-k8s.io", version="v1beta1", plural="sandboxes")
    assert listed["kind"] == "SandboxList" and [i["metadata"]["name"] for i in listed["items"]] == ["box"]

    answer = await custom.delete_namespaced_custom_object(**SANDBOXES, name="box")
    assert answer == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": "box", "group": "agents.x-k8s.io", "kind": "sandboxes", "uid": created["metadata"]["uid"]},
    }


async def test_httproute_defaults_nested_in_lists(custom):
    created = await custom.create_namespaced_custom_object(**ROUTES, body=route("preview"))
    assert created["spec"]["parentRefs"] == [{"name": "edge", "group": "gateway.networking.k8s.io", "kind": "Gateway"}]
    assert created["spec"]["rules"] == [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]


async def test_every_served_version_reads_the_same_object(api, custom):
    api.create(sandbox("box"))
    through_alpha = await custom.get_namespaced_custom_object(
        group="agents.x-k8s.io", version="v1alpha1", namespace="default", plural="sandboxes", name="box"
    )
    assert through_alpha["apiVersion"] == "agents.x-k8s.io/v1alpha1"
    alpha = sandbox("alpha", replicas=2)
    alpha["apiVersion"] = "agents.x-k8s.io/v1alpha1"
    with pytest.raises(ApiException) as caught:  # validated against the requested version's schema
        await custom.create_namespaced_custom_object(
            group="agents.x-k8s.io", version="v1alpha1", namespace="default", plural="sandboxes", body=alpha
        )
    assert causes(caught.value) == {"spec.replicas": "FieldValueInvalid"}


async def test_generate_name(core):
    body = service("")
    body["metadata"] = {"generateName": "preview-"}
    created = await core.create_namespaced_service("default", body)
    assert re.fullmatch(r"preview-[a-z0-9]{5}", created.metadata.name)


async def test_cluster_scoped_resources_dry_run_and_missing_subresources(api, custom, http):
    gateway_class = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GatewayClass",
        "metadata": {"name": "edge", "namespace": "ignored"},
        "spec": {"controllerName": "example.com/gateway"},
    }
    classes = {"group": "gateway.networking.k8s.io", "version": "v1", "plural": "gatewayclasses"}
    created = await custom.create_cluster_custom_object(**classes, body=gateway_class)
    assert "namespace" not in created["metadata"]

    template = {
        "apiVersion": "extensions.agents.x-k8s.io/v1beta1",
        "kind": "SandboxTemplate",
        "metadata": {"name": "python"},
        "spec": {"podTemplate": {"spec": {"containers": [{"name": "main", "image": "python:3.12"}]}}},
    }
    templates = {"group": "extensions.agents.x-k8s.io", "version": "v1beta1", "plural": "sandboxtemplates"}
    await custom.create_namespaced_custom_object(**templates, namespace="default", body=template, dry_run="All")
    assert api.list("extensions.agents.x-k8s.io/v1beta1", "SandboxTemplate") == []
    api.create(template)
    url = f"{api.url}/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/default/sandboxtemplates/python/status"
    async with http.get(url) as response:  # this CRD declares no status subresource
        assert response.status == 404


# ----- patch


async def test_merge_patch_and_generation(custom):
    await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box"))
    labelled = await custom.patch_namespaced_custom_object(
        **SANDBOXES, name="box", body={"metadata": {"labels": {"team": "a"}}}, _content_type=MERGE
    )
    assert labelled["metadata"]["labels"] == {"team": "a"}
    assert labelled["metadata"]["generation"] == 1  # metadata only

    changed = await custom.patch_namespaced_custom_object(
        **SANDBOXES, name="box", body={"spec": {"shutdownPolicy": "Delete", "service": None}}, _content_type=MERGE
    )
    assert changed["spec"]["shutdownPolicy"] == "Delete"
    assert changed["metadata"]["generation"] == 2

    same = await custom.patch_namespaced_custom_object(
        **SANDBOXES, name="box", body={"spec": {"shutdownPolicy": "Delete"}}, _content_type=MERGE
    )
    assert same["metadata"]["resourceVersion"] == changed["metadata"]["resourceVersion"]  # a no-op writes nothing


async def test_json_patch(custom):
    await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box"))
    patched = await custom.patch_namespaced_custom_object(  # a list body: the client sends json-patch
        **SANDBOXES,
        name="box",
        body=[
            {"op": "test", "path": "/spec/operatingMode", "value": "Running"},
            {"op": "replace", "path": "/spec/operatingMode", "value": "Suspended"},
            {"op": "add", "path": "/metadata/annotations", "value": {}},
            {"op": "add", "path": "/metadata/annotations/example.com~1owner", "value": "me"},
            {"op": "add", "path": "/spec/podTemplate/spec/containers/-", "value": {"name": "side", "image": "busybox"}},
        ],
    )
    assert patched["spec"]["operatingMode"] == "Suspended"
    assert patched["metadata"]["annotations"] == {"example.com/owner": "me"}
    assert [c["name"] for c in patched["spec"]["podTemplate"]["spec"]["containers"]] == ["main", "side"]

    with pytest.raises(ApiException) as caught:
        await custom.patch_namespaced_custom_object(
            **SANDBOXES, name="box", body=[{"op": "test", "path": "/spec/operatingMode", "value": "Running"}]
        )
    assert caught.value.status == 422


async def test_dict_patch_on_custom_object_needs_an_explicit_content_type(custom):
    """kubernetes-asyncio picks json-patch for a dict body here; a real server refuses that with 400."""
    await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box"))
    with pytest.raises(ApiException) as caught:
        await custom.patch_namespaced_custom_object(**SANDBOXES, name="box", body={"spec": {}})
    assert caught.value.status == 400
    assert "jsonpatch.Patch" in status_body(caught.value)["message"]


async def test_strategic_merge_patch_on_core_and_refused_on_custom(core, custom):
    await core.create_namespaced_service("default", service("web", labels={"a": "1"}))
    patched = await core.patch_namespaced_service("web", "default", {"metadata": {"labels": {"b": "2"}}})
    assert patched.metadata.labels == {"a": "1", "b": "2"}

    await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box"))
    with pytest.raises(ApiException) as caught:
        await custom.patch_namespaced_custom_object(
            **SANDBOXES, name="box", body={"spec": {}}, _content_type="application/strategic-merge-patch+json"
        )
    assert caught.value.status == 415


# ----- errors a real server gives


async def test_not_found_status_is_exactly_the_servers(http, api, custom):
    expected = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'sandboxes.agents.x-k8s.io "nope" not found',
        "reason": "NotFound",
        "details": {"name": "nope", "group": "agents.x-k8s.io", "kind": "sandboxes"},
        "code": 404,
    }
    async with http.get(f"{api.url}/apis/agents.x-k8s.io/v1beta1/namespaces/default/sandboxes/nope") as response:
        assert response.status == 404
        assert await response.text() == json.dumps(expected, separators=(",", ":"))
    with pytest.raises(ApiException) as caught:
        await custom.get_namespaced_custom_object(**SANDBOXES, name="nope")
    assert caught.value.status == 404 and status_body(caught.value) == expected


async def test_already_exists_and_stale_resource_version_conflict(core, custom):
    first = await core.create_namespaced_service("default", service("web"))
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_service("default", service("web"))
    assert caught.value.status == 409
    assert status_body(caught.value)["reason"] == "AlreadyExists"
    assert status_body(caught.value)["message"] == 'services "web" already exists'

    first.metadata.labels = {"round": "1"}
    await core.replace_namespaced_service("web", "default", first)
    first.metadata.labels = {"round": "2"}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as caught:
        await core.replace_namespaced_service("web", "default", first)
    assert caught.value.status == 409
    assert status_body(caught.value)["message"] == (
        'Operation cannot be fulfilled on services "web": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )

    stale = {"metadata": {"resourceVersion": first.metadata.resource_version, "labels": {"x": "y"}}}
    with pytest.raises(ApiException) as caught:
        await core.patch_namespaced_service("web", "default", stale)
    assert caught.value.status == 409

    created = await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box"))
    del created["metadata"]["resourceVersion"]  # custom resources refuse an unconditional PUT
    with pytest.raises(ApiException) as caught:
        await custom.replace_namespaced_custom_object(**SANDBOXES, name="box", body=created)
    assert caught.value.status == 422
    assert causes(caught.value) == {"metadata.resourceVersion": "FieldValueInvalid"}


async def test_invalid_objects_get_422_with_field_causes(core, custom):
    bad_route = route("bad", rules=[{"matches": [{"path": {"type": "Prefix", "value": "/"}}]}])
    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(**ROUTES, body=bad_route)
    assert caught.value.status == 422
    assert causes(caught.value) == {"spec.rules[0].matches[0].path.type": "FieldValueNotSupported"}
    assert status_body(caught.value)["details"]["kind"] == "HTTPRoute"

    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box", operatingMode="Paused"))
    assert status_body(caught.value)["message"] == (
        'Sandbox.agents.x-k8s.io "box" is invalid: spec.operatingMode: Unsupported value: "Paused": '
        'supported values: "Running", "Suspended"'
    )

    missing_template = sandbox("box")
    del missing_template["spec"]["podTemplate"]
    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(**SANDBOXES, body=missing_template)
    assert causes(caught.value) == {"spec.podTemplate": "FieldValueRequired"}

    ports = [{"name": "a", "port": 0, "targetPort": 80}, {"name": "b", "port": 70000, "targetPort": 80}]
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_service("default", service("web", ports=ports))
    assert causes(caught.value) == {
        "spec.ports[0].port": "FieldValueInvalid",
        "spec.ports[1].port": "FieldValueInvalid",
    }

    ports = [{"name": "http", "port": 80}, {"name": "http", "port": 81, "targetPort": "Not_A_Name"}]
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_service("default", service("web", ports=ports))
    assert causes(caught.value) == {
        "spec.ports[1].name": "FieldValueDuplicate",
        "spec.ports[1].targetPort": "FieldValueInvalid",
    }

    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_service("default", service("web", ports=[]))
    assert causes(caught.value) == {"spec.ports": "FieldValueRequired"}

    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_pod("default", pod("box", image=""))
    assert causes(caught.value) == {"spec.containers[0].image": "FieldValueRequired"}


async def test_names_labels_and_annotations_are_validated(core, custom):
    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("MyBox"))
    assert causes(caught.value) == {"metadata.name": "FieldValueInvalid"}
    assert "RFC 1123 subdomain" in status_body(caught.value)["message"]

    with pytest.raises(ApiException) as caught:  # Service names are DNS-1035 labels: no leading digit
        await core.create_namespaced_service("default", service("1web"))
    assert "DNS-1035 label" in status_body(caught.value)["message"]
    await core.create_namespaced_pod("default", pod("1web"))  # a Pod name may start with one

    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_service("default", service("web", labels={"bad key": "v", "ok": "bad value!"}))
    fields = [cause["field"] for cause in status_body(caught.value)["details"]["causes"]]
    assert fields == ["metadata.labels", "metadata.labels"]  # the bad key and the bad value

    huge = sandbox("box")
    huge["metadata"]["annotations"] = {"blob": "x" * 300_000}
    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(**SANDBOXES, body=huge)
    assert causes(caught.value) == {"metadata.annotations": "FieldValueTooLong"}


async def test_bad_requests(core, custom):
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_service("default", service("web", namespace="other"))
    assert caught.value.status == 400
    assert status_body(caught.value)["message"] == (
        "the namespace of the provided object does not match the namespace sent on the request"
    )

    with pytest.raises(ApiException) as caught:  # a typed field with the wrong JSON type
        await core.create_namespaced_service("default", service("web", ports=[{"port": "eighty"}]))
    assert caught.value.status == 400
    message = status_body(caught.value)["message"]
    assert "cannot unmarshal string into Go struct field ServicePort.spec.ports.port" in message

    existing = await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box"))
    existing["metadata"]["name"] = "copy"  # created from a read object: resourceVersion still set
    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(**SANDBOXES, body=existing)
    assert caught.value.status == 500
    assert "resourceVersion should not be set on objects to be created" in status_body(caught.value)["message"]

    kindless = sandbox("kindless")
    del kindless["kind"]
    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(**SANDBOXES, body=kindless)
    assert caught.value.status == 400


async def test_cluster_ip_is_allocated_once_and_immutable(core):
    first = await core.create_namespaced_service("default", service("one"))
    second = await core.create_namespaced_service("default", service("two"))
    assert first.spec.cluster_ip != second.spec.cluster_ip

    body = service("one")  # a PUT that leaves the allocated IP out keeps it
    body["metadata"]["resourceVersion"] = first.metadata.resource_version
    kept = await core.replace_namespaced_service("one", "default", body)
    assert kept.spec.cluster_ip == first.spec.cluster_ip

    kept.spec.cluster_ip, kept.spec.cluster_ips = "10.96.200.1", None
    with pytest.raises(ApiException) as caught:
        await core.replace_namespaced_service("one", "default", kept)
    assert causes(caught.value) == {"spec.clusterIP": "FieldValueInvalid"}
    assert "field is immutable" in status_body(caught.value)["message"]

    chosen = await core.create_namespaced_service("default", service("three", clusterIP="10.96.50.50"))
    assert chosen.spec.cluster_ip == "10.96.50.50"
    for taken_or_outside in ("10.96.50.50", "192.168.0.1"):
        with pytest.raises(ApiException) as caught:
            await core.create_namespaced_service("default", service("four", clusterIP=taken_or_outside))
        assert caught.value.status == 422


# ----- unknown fields


async def test_unknown_fields_are_pruned_with_a_warning(http, api):
    body = sandbox("box")
    body["spec"]["bogus"] = True
    body["spec"]["podTemplate"]["extra"] = 1
    url = f"{api.url}/apis/agents.x-k8s.io/v1beta1/namespaces/default/sandboxes"
    async with http.post(url, json=body) as response:
        assert response.status == 201
        assert sorted(response.headers.getall("Warning")) == [
            '299 - "unknown field \\"spec.bogus\\""',
            '299 - "unknown field \\"spec.podTemplate.extra\\""',
        ]
        stored = await response.json()
    assert "bogus" not in stored["spec"] and "extra" not in stored["spec"]["podTemplate"]
    assert stored["spec"]["podTemplate"]["spec"]["containers"] == [{"name": "main", "image": "python:3.12"}]


def test_structural_schema_prunes_defaults_and_preserves_as_declared():
    """The schema rules on their own, for what no vendored CRD shows in a short object."""
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "mode": {"type": "string", "default": "Auto"},
                    "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "weights": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                    "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                },
            }
        },
    }
    obj = {"spec": {"mode": None, "config": {"anything": [1]}, "weights": {"a": 1}, "port": "http", "junk": 1}}
    assert schema_rules.prune_and_default(obj, schema) == ["spec.junk"]
    assert obj["spec"] == {"mode": "Auto", "config": {"anything": [1]}, "weights": {"a": 1}, "port": "http"}
    assert schema_rules.validate(obj, schema) == []

    obj["spec"].update(weights={"a": -1}, port=1.5)
    assert [(e.field, e.reason) for e in schema_rules.validate(obj, schema)] == [
        ("spec.weights.a", "FieldValueInvalid"),
        ("spec.port", "FieldValueTypeInvalid"),
    ]


async def test_strict_field_validation_rejects_unknown_fields(core, custom):
    body = sandbox("box")
    body["spec"]["bogus"] = True
    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(**SANDBOXES, body=body, field_validation="Strict")
    assert caught.value.status == 400
    assert status_body(caught.value)["message"] == 'strict decoding error: unknown field "spec.bogus"'

    body = service("web")
    body["spec"]["ports"][0]["bogus"] = 1
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_service("default", body, field_validation="Strict")
    assert status_body(caught.value)["message"] == 'strict decoding error: unknown field "spec.ports[0].bogus"'
    created = await core.create_namespaced_service("default", body)  # the default (Warn) drops it
    assert created.spec.ports[0].port == 80


# ----- status subresource and generation


async def test_status_subresource_separates_spec_and_status(api, custom):
    await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box"))
    via_status = await custom.patch_namespaced_custom_object_status(
        **SANDBOXES,
        name="box",
        body={"spec": {"operatingMode": "Suspended"}, "status": {"serviceFQDN": "box.default.svc"}},
        _content_type=MERGE,
    )
    assert via_status["status"] == {"serviceFQDN": "box.default.svc"}
    assert via_status["spec"]["operatingMode"] == "Running"  # spec changes through /status are ignored
    assert via_status["metadata"]["generation"] == 1

    via_main = await custom.patch_namespaced_custom_object(
        **SANDBOXES, name="box", body={"status": {"serviceFQDN": "changed"}}, _content_type=MERGE
    )
    assert via_main["status"] == {"serviceFQDN": "box.default.svc"}  # and status changes through the main resource

    written = api.set_status("agents.x-k8s.io/v1beta1", "Sandbox", "default", "box", {"podIPs": ["10.0.0.7"]})
    assert written["status"] == {"podIPs": ["10.0.0.7"]} and written["metadata"]["generation"] == 1

    with pytest.raises(ApiError) as caught:  # status is validated too
        api.set_status("agents.x-k8s.io/v1beta1", "Sandbox", "default", "box", {"podIPs": "10.0.0.7"})
    assert caught.value.code == 422


async def test_test_setup_methods(api):
    with pytest.raises(ApiError) as caught:
        api.create(sandbox("box", operatingMode="Paused"))
    assert caught.value.code == 422 and caught.value.status["reason"] == "Invalid"

    api.create(sandbox("box"))
    other = sandbox("box")
    other["metadata"]["namespace"] = "team-b"
    api.create(other)
    assert api.get("agents.x-k8s.io/v1beta1", "Sandbox", "default", "missing") is None
    assert [s["metadata"]["namespace"] for s in api.list("agents.x-k8s.io/v1beta1", "Sandbox")] == ["default", "team-b"]
    assert len(api.list("agents.x-k8s.io/v1beta1", "Sandbox", "team-b")) == 1
    api.delete("agents.x-k8s.io/v1beta1", "Sandbox", "team-b", "box")
    assert api.get("agents.x-k8s.io/v1beta1", "Sandbox", "team-b", "box") is None


# ----- selectors and paging


async def test_label_and_field_selectors(api, core):
    api.create(service("a", labels={"app": "web", "tier": "front"}))
    api.create(service("b", labels={"app": "web", "tier": "back"}))
    api.create(service("c", labels={"app": "db"}))
    cases = {
        "app=web": ["a", "b"],
        "app==web": ["a", "b"],
        "app!=web": ["c"],
        "tier in (front, back)": ["a", "b"],
        "tier notin (front)": ["b", "c"],
        "tier": ["a", "b"],
        "!tier": ["c"],
        "app=web,tier=back": ["b"],
    }
    for selector, expected in cases.items():
        listed = await core.list_namespaced_service("default", label_selector=selector)
        assert [s.metadata.name for s in listed.items] == expected, selector

    listed = await core.list_service_for_all_namespaces(field_selector="metadata.name!=a")
    assert [s.metadata.name for s in listed.items] == ["b", "c"]
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_service("default", field_selector="spec.bogus=1")
    assert caught.value.status == 400
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_service("default", label_selector="app in (web")
    assert caught.value.status == 400


async def test_list_pages_with_limit_and_continue(api, custom):
    for name in ["e", "a", "d", "b", "c"]:
        api.create(sandbox(name))
    seen, token, pages = [], None, 0
    while True:
        page = await custom.list_namespaced_custom_object(**SANDBOXES, limit=2, _continue=token)
        seen += [item["metadata"]["name"] for item in page["items"]]
        pages += 1
        token = page["metadata"].get("continue")
        if not token:
            break
    assert seen == ["a", "b", "c", "d", "e"] and pages == 3


# ----- watches


async def next_events(stream, count: int, timeout: float = 5.0) -> list[tuple[str, str]]:
    events = [await asyncio.wait_for(stream.__anext__(), timeout) for _ in range(count)]
    return [(event["type"], event["raw_object"]["metadata"]["name"]) for event in events]


async def test_watch_starts_with_current_objects_then_follows(api, custom):
    api.create(sandbox("one"))
    api.create(sandbox("two"))
    async with watch.Watch() as w:
        stream = w.stream(custom.list_namespaced_custom_object, **SANDBOXES, timeout_seconds=10)
        assert await next_events(stream, 2) == [("ADDED", "one"), ("ADDED", "two")]
        api.create(sandbox("three"))
        api.set_status("agents.x-k8s.io/v1beta1", "Sandbox", "default", "one", {"serviceFQDN": "one.default.svc"})
        api.delete("agents.x-k8s.io/v1beta1", "Sandbox", "default", "two")
        assert await next_events(stream, 3) == [("ADDED", "three"), ("MODIFIED", "one"), ("DELETED", "two")]
        assert w.resource_version == api.resource_version


async def test_watch_resumes_from_a_resource_version(api, custom, core):
    api.create(sandbox("before"))
    listed = await custom.list_namespaced_custom_object(**SANDBOXES)
    api.create(sandbox("after"))
    api.create(service("noise"))  # another resource: not in this watch
    api.delete("agents.x-k8s.io/v1beta1", "Sandbox", "default", "before")
    async with watch.Watch() as w:
        stream = w.stream(
            custom.list_namespaced_custom_object,
            **SANDBOXES,
            resource_version=listed["metadata"]["resourceVersion"],
            timeout_seconds=10,
        )
        assert await next_events(stream, 2) == [("ADDED", "after"), ("DELETED", "before")]

    async with watch.Watch() as w:  # the typed core API, live
        stream = w.stream(core.list_namespaced_service, "default", timeout_seconds=10)
        assert await next_events(stream, 1) == [("ADDED", "noise")]
        api.create(service("fresh"))
        event = await asyncio.wait_for(stream.__anext__(), 5)
        assert event["type"] == "ADDED" and isinstance(event["object"], client.V1Service)


async def test_watch_from_a_compacted_resource_version_gets_410(api, custom, http):
    first = api.create(sandbox("one"))
    old = first["metadata"]["resourceVersion"]
    api.create(sandbox("two"))
    api.compact()

    url = f"{api.url}/apis/agents.x-k8s.io/v1beta1/namespaces/default/sandboxes?watch=true&resourceVersion={old}"
    async with http.get(url) as response:
        lines = (await response.read()).splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {old} ({api.resource_version})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]

    # kubernetes-asyncio turns the ERROR event into ApiException(410) ...
    async with watch.Watch() as w:
        with pytest.raises(ApiException) as caught:
            stream = w.stream(custom.list_namespaced_custom_object, **SANDBOXES, resource_version=old, timeout_seconds=5)
            async for _ in stream:
                pass
    assert caught.value.status == 410 and caught.value.reason.startswith("Expired: too old resource version")

    # ... and without timeout_seconds it retries once from the same version before raising.
    watches_before = sum("watch=True" in path for _, path in api.requests)
    async with watch.Watch() as w:
        with pytest.raises(ApiException) as caught:
            async for _ in w.stream(custom.list_namespaced_custom_object, **SANDBOXES, resource_version=old):
                pass
    assert caught.value.status == 410
    assert sum("watch=True" in path for _, path in api.requests) - watches_before == 2


async def test_watch_ends_at_timeout_seconds(api, custom):
    api.create(sandbox("one"))
    started = time.monotonic()
    async with watch.Watch() as w:
        events = [e async for e in w.stream(custom.list_namespaced_custom_object, **SANDBOXES, timeout_seconds=1)]
    assert [e["type"] for e in events] == ["ADDED"]
    assert 0.9 <= time.monotonic() - started < 3


async def test_watch_bookmarks_carry_only_the_resource_version(api, custom):
    api.create(sandbox("one"))
    async with watch.Watch() as w:
        stream = w.stream(
            custom.list_namespaced_custom_object, **SANDBOXES, allow_watch_bookmarks=True, timeout_seconds=5
        )
        assert await next_events(stream, 1) == [("ADDED", "one")]
        api.create(service("elsewhere"))  # moves the global resourceVersion on
        bookmark = await asyncio.wait_for(stream.__anext__(), 5)
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["raw_object"] == {
        "kind": "Sandbox",
        "apiVersion": "agents.x-k8s.io/v1beta1",
        "metadata": {"resourceVersion": api.resource_version},
    }


async def test_watch_selector_transitions(api, custom):
    async with watch.Watch() as w:
        stream = w.stream(
            custom.list_namespaced_custom_object, **SANDBOXES, label_selector="tier=web", timeout_seconds=10
        )
        api.create(sandbox("db", labels={"tier": "db"}))  # never matches: never seen
        api.create(sandbox("box", labels={"tier": "web"}))
        assert await next_events(stream, 1) == [("ADDED", "box")]
        for tier in ("db", "web"):
            await custom.patch_namespaced_custom_object(
                **SANDBOXES, name="box", body={"metadata": {"labels": {"tier": tier}}}, _content_type=MERGE
            )
        assert await next_events(stream, 2) == [("DELETED", "box"), ("ADDED", "box")]


async def test_stop_cuts_watches_and_the_client_resumes_after_start(api, custom):
    api.create(sandbox("one"))
    async with watch.Watch() as w:
        stream = w.stream(custom.list_namespaced_custom_object, **SANDBOXES, timeout_seconds=30)
        assert await next_events(stream, 1) == [("ADDED", "one")]
        await api.stop()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(stream.__anext__(), 5)
        last_seen = w.resource_version

    api.create(sandbox("while-down"))  # state lives on while the API is away
    with pytest.raises(aiohttp.ClientConnectionError):
        await custom.list_namespaced_custom_object(**SANDBOXES)

    url = api.url
    await api.start()
    assert api.url == url
    relisted = await custom.list_namespaced_custom_object(**SANDBOXES)
    assert [i["metadata"]["name"] for i in relisted["items"]] == ["one", "while-down"]
    async with watch.Watch() as w:
        stream = w.stream(
            custom.list_namespaced_custom_object, **SANDBOXES, resource_version=last_seen, timeout_seconds=10
        )
        assert await next_events(stream, 1) == [("ADDED", "while-down")]
    assert int(api.create(sandbox("later"))["metadata"]["resourceVersion"]) > int(last_seen)


# ----- owner references, garbage collection, finalizers


async def test_deleting_a_sandbox_collects_what_it_owns(api, core, custom):
    owner = api.create(sandbox("box"))
    keeper = api.create(sandbox("keeper"))
    api.create(route("box-preview", owners=[owner_reference(owner)]))
    api.create(service("box", owners=[owner_reference(owner)]))
    api.create(service("shared", owners=[owner_reference(owner), {**owner_reference(keeper), "controller": False}]))
    api.create(service("box", namespace="elsewhere", owners=[owner_reference(owner)]))  # cross-namespace: ignored

    async with watch.Watch() as w:
        since = api.resource_version
        stream = w.stream(core.list_namespaced_service, "default", resource_version=since, timeout_seconds=10)
        await custom.delete_namespaced_custom_object(**SANDBOXES, name="box")
        assert sorted(await next_events(stream, 2)) == [("DELETED", "box"), ("MODIFIED", "shared")]

    assert api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "default", "box-preview") is None
    assert api.get("v1", "Service", "default", "box") is None
    shared = api.get("v1", "Service", "default", "shared")
    assert [r["name"] for r in shared["metadata"]["ownerReferences"]] == ["keeper"]
    assert api.get("v1", "Service", "elsewhere", "box") is not None


async def test_orphan_propagation_keeps_dependents(api, custom):
    owner = api.create(sandbox("box"))
    api.create(route("box-preview", owners=[owner_reference(owner)]))
    await custom.delete_namespaced_custom_object(**SANDBOXES, name="box", propagation_policy="Orphan")
    orphan = api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "default", "box-preview")
    assert orphan is not None and "ownerReferences" not in orphan["metadata"]


async def test_finalizers_hold_a_deletion_until_removed(api, custom):
    held = sandbox("box")
    held["metadata"]["finalizers"] = ["sandgate.dev/cleanup"]
    api.create(held)
    terminating = await custom.delete_namespaced_custom_object(**SANDBOXES, name="box")
    assert terminating["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiException) as caught:
        await custom.patch_namespaced_custom_object(
            **SANDBOXES, name="box", body={"metadata": {"finalizers": ["sandgate.dev/cleanup", "more"]}},
            _content_type=MERGE,
        )
    assert causes(caught.value) == {"metadata.finalizers": "FieldValueForbidden"}
    await custom.patch_namespaced_custom_object(
        **SANDBOXES, name="box", body={"metadata": {"finalizers": None}}, _content_type=MERGE
    )
    assert api.get("agents.x-k8s.io/v1beta1", "Sandbox", "default", "box") is None


# ----- authentication, discovery, fault injection


async def test_requests_without_the_token_get_401(api, k8s):
    unauthorized = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    async with aiohttp.ClientSession() as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with anonymous.get(f"{api.url}/api/v1/namespaces/default/services", headers=headers) as response:
                assert response.status == 401 and await response.json() == unauthorized

    k8s.configuration.api_key["BearerToken"] = "Bearer wrong"
    with pytest.raises(ApiException) as caught:
        await client.CoreV1Api(k8s).list_namespaced_service("default")
    assert caught.value.status == 401


async def test_discovery(k8s, http, api):
    assert (await client.VersionApi(k8s).get_code()).git_version.startswith("v1.")
    assert (await client.CoreApi(k8s).get_api_versions()).versions == ["v1"]
    groups = {g.name: g.preferred_version.version for g in (await client.ApisApi(k8s).get_api_versions()).groups}
    assert groups["agents.x-k8s.io"] == "v1beta1" and groups["gateway.networking.k8s.io"] == "v1"
    async with http.get(f"{api.url}/apis/agents.x-k8s.io/v1beta1") as response:
        resources = {r["name"] for r in (await response.json())["resources"]}
    assert {"sandboxes", "sandboxes/status"} <= resources


async def test_fault_injection(api, core, custom):
    api.fail_next("GET", "services", status=503, times=2, reason="ServiceUnavailable")
    for _ in range(2):
        with pytest.raises(ApiException) as caught:
            await core.list_namespaced_service("default")
        assert caught.value.status == 503 and status_body(caught.value)["reason"] == "ServiceUnavailable"
    await core.list_namespaced_service("default")

    api.fail_next("POST", "sandboxes")
    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(**SANDBOXES, body=sandbox("box"))
    assert caught.value.status == 500
    assert api.list("agents.x-k8s.io/v1beta1", "Sandbox") == []

    api.fail_next("GET", "sandboxes", status=429, reason="TooManyRequests")  # watches are GETs too
    async with watch.Watch() as w:
        with pytest.raises(ApiException) as caught:
            async for _ in w.stream(custom.list_namespaced_custom_object, **SANDBOXES, timeout_seconds=1):
                pass
    assert caught.value.status == 429
    assert sum(m == "GET" and "/services" in p for m, p in api.requests) == 3


# ----- pod exec


def running_pod(api, name: str = "box", **container) -> None:
    api.create(pod(name, **container))
    api.set_status("v1", "Pod", "default", name, {"phase": "Running"})


def exec_url(api, pod_name: str, command: list[str], *, stdin: bool = False, tty: bool = False) -> str:
    flags = {"stdin": stdin, "stdout": True, "stderr": True, "tty": tty}
    query = [("command", part) for part in command] + [(k, str(v).lower()) for k, v in flags.items()]
    return f"{api.url}/api/v1/namespaces/default/pods/{pod_name}/exec?{urlencode(query)}"


async def received(sock, until: bytes | None = None, timeout: float = 5.0) -> dict[int, bytes]:
    """Data per channel, until the socket closes (or `until` shows up on stdout)."""
    channels: dict[int, bytes] = defaultdict(bytes)
    async with asyncio.timeout(timeout):
        async for message in sock:
            if message.type == aiohttp.WSMsgType.BINARY and len(message.data) > 1:
                channels[message.data[0]] += message.data[1:]
            if until is not None and re.search(until, channels[1]):
                break
    return channels


async def close_code_sent(sock) -> int:
    """The code in the server's close frame (the socket's own close_code says how *we* closed)."""
    async with asyncio.timeout(5):
        while (message := await sock.receive()).type != aiohttp.WSMsgType.CLOSE:
            pass
    return message.data


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, we read
        return False
    return state != "Z"  # a zombie is dead; only its parent's reaping is missing


async def gone(*pids: int) -> bool:
    for _ in range(50):
        if not any(alive(pid) for pid in pids):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_exec_preloaded_runs_a_real_command_in_the_pods_shell(api, ws_core, tmp_path):
    running_pod(api, env=[{"name": "FROM_SPEC", "value": "spec"}])
    api.register_pod_shell("default", "box", cwd=tmp_path, env={"FROM_TEST": "test"})
    output = await ws_core.connect_get_namespaced_pod_exec(
        "box", "default", command=["sh", "-c", "echo $FROM_SPEC $FROM_TEST; pwd; echo oops >&2"],
        stdin=False, stdout=True, stderr=True, tty=False,
    )
    assert "spec test\n" in output and f"{tmp_path}\n" in output and "oops\n" in output


async def test_exec_interactive_tty_session_over_v4(api, ws_core):
    running_pod(api)
    connecting = await ws_core.connect_get_namespaced_pod_exec(
        "box", "default", command=["/bin/sh"], stdin=True, stdout=True, stderr=True, tty=True, _preload_content=False
    )
    async with connecting as sock:
        await sock.send_bytes(b"\x00GREETING=sandgate\n")
        await sock.send_bytes(b"\x04" + json.dumps({"Width": 123, "Height": 45}).encode())
        await sock.send_bytes(b"\x00echo value=$GREETING; stty size; exit 3\n")
        channels = await received(sock)
    assert b"value=sandgate" in channels[1]
    assert b"45 123" in channels[1]
    assert 2 not in channels  # a tty merges stderr into stdout
    status = json.loads(channels[3])
    assert status["reason"] == "NonZeroExitCode"
    assert status["message"] == (
        "command terminated with non-zero exit code: error executing command [/bin/sh], exit code 3"
    )
    assert WsApiClient.parse_error_data(channels[3]) == 3


async def test_exec_v5_close_frame_ends_stdin(api, http):
    running_pod(api)
    offered = ("v5.channel.k8s.io", "v4.channel.k8s.io")
    async with http.ws_connect(exec_url(api, "box", ["cat"], stdin=True), protocols=offered) as sock:
        assert sock.protocol == "v5.channel.k8s.io"  # the best one offered
        await sock.send_bytes(b"\x00hello over v5\n")
        await sock.send_bytes(bytes([255, 0]))
        channels = await received(sock)
    assert channels[1] == b"hello over v5\n"
    assert json.loads(channels[3]) == {"metadata": {}, "status": "Success"}


async def test_exec_over_post_and_the_base64_protocol(api, http):
    running_pod(api)
    url = exec_url(api, "box", ["echo", "hi"])
    async with http.ws_connect(url, method="POST", protocols=("base64.channel.k8s.io",)) as sock:
        frames = [message.data async for message in sock if message.type == aiohttp.WSMsgType.TEXT]
    assert "1aGkK" in frames  # channel "1", base64 of b"hi\n"


async def test_closing_the_socket_kills_the_process_group(api, http):
    running_pod(api)
    command = ["sh", "-c", "sleep 300 & echo pids $$ $!; wait"]
    async with http.ws_connect(exec_url(api, "box", command), protocols=("v4.channel.k8s.io",)) as sock:
        channels = await received(sock, until=rb"pids \d+ \d+")
    shell, background = map(int, re.search(rb"pids (\d+) (\d+)", channels[1]).groups())
    assert await gone(shell, background)


async def test_stop_closes_exec_sockets_and_kills_their_processes(api, http):
    running_pod(api)
    url = exec_url(api, "box", ["/bin/sh"], stdin=True, tty=True)
    async with http.ws_connect(url, protocols=("v4.channel.k8s.io",)) as sock:
        await sock.send_bytes(b"\x00echo pid=$$\n")
        channels = await received(sock, until=rb"pid=\d+")
        await api.stop()
        assert await close_code_sent(sock) == aiohttp.WSCloseCode.GOING_AWAY
    assert await gone(int(re.search(rb"pid=(\d+)", channels[1])[1]))


async def test_exec_is_refused_like_a_real_server(api, http, ws_core):
    api.create(pod("idle"))  # Pending
    async with http.get(exec_url(api, "idle", ["true"])) as response:
        assert response.status == 400 and (await response.json())["message"] == "pod idle is not running"
    async with http.get(exec_url(api, "ghost", ["true"])) as response:
        assert response.status == 404 and (await response.json())["message"] == 'pods "ghost" not found'
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await ws_core.connect_get_namespaced_pod_exec("idle", "default", command=["true"], stdout=True)
    assert caught.value.status == 400

    running_pod(api)
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:  # no channel protocol offered
        await http.ws_connect(exec_url(api, "box", ["true"]), protocols=("v6.unknown",))
    assert caught.value.status == 400
    async with http.ws_connect(exec_url(api, "box", ["no-such-command"]), protocols=("v4.channel.k8s.io",)) as sock:
        status = json.loads((await received(sock))[3])
    assert status["status"] == "Failure" and "no-such-command" in status["message"]
