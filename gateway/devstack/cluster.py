"""Stand-in for the Kubernetes API server: exactly what the shipped SandboxRouter and PreviewZone
use, in the one namespace they open, `sandboxes`.

It holds the demo sandbox `sandboxes/demo`: a SandboxClaim naming the owner in the
`sandgate.dev/owner` annotation, and the Sandbox it created, Ready, with pod IP 127.0.0.1 (where
the devstack runs the demo sandbox app, gateway/devstack/demo_sandbox.py) and the pod's label
selector in `status.selector`. These two never change. Previews add Services and HTTPRoutes.

- Sandboxes (agents.x-k8s.io/v1beta1), SandboxClaims (extensions.agents.x-k8s.io/v1beta1): get,
  list and watch.
- Services (v1) and HTTPRoutes (gateway.networking.k8s.io/v1): also create (409 AlreadyExists),
  merge patch (`application/merge-patch+json` only) and delete, honouring the `uid` and
  `resourceVersion` preconditions of the DeleteOptions (409 Conflict). HTTPRoutes are checked
  against the vendored Gateway API CRD (422 Invalid), Services for ports and a selector.
- Lists and watches take a `labelSelector` (equality and existence terms). A watch without
  `resourceVersion` (or "0") starts with every object as ADDED; from N it replays the changes
  after N (an ERROR 410 Expired event once they are no longer kept); then it streams changes
  until `timeoutSeconds` or the client leaves.
- A missing object is 404 NotFound, and so is any write outside namespace `sandboxes`.
- Every request needs the bearer token of the kubeconfig written for this run.

Not here: garbage collection (the Sandbox that owns the previews' objects is never deleted),
finalizers, other patch types, field selectors, bookmarks, dry runs, and pod exec: in
`sandgate dev` the terminal answers 502. The full test double of the API server is
tests/support/kubeapi.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path

import yaml
from aiohttp import web

from gateway.config.schemas import format_path, validate
from gateway.devstack.cluster_store import (
    ApiError, Event, Resource, Selector, Store, TooOld, conflict, label_selector, labels_of, merge_patch, not_found,
    now,
)
from gateway.devstack.policy import OWNER_ANNOTATION
from gateway.devstack.urls import SANDBOX_NAME, SANDBOX_NAMESPACE

POD_IP = "127.0.0.1"  # the one loopback address every OS configures (127.0.0.2 is Linux-only)
SANDBOXES = Resource("agents.x-k8s.io", "v1beta1", "sandboxes", "Sandbox")
CLAIMS = Resource("extensions.agents.x-k8s.io", "v1beta1", "sandboxclaims", "SandboxClaim")
SERVICES = Resource("", "v1", "services", "Service", writable=True)
HTTPROUTES = Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", writable=True)
RESOURCES = {(r.group, r.version, r.plural): r for r in (SANDBOXES, CLAIMS, SERVICES, HTTPROUTES)}
MERGE_PATCH = "application/merge-patch+json"
# What names a real server takes: a Service's is an RFC 1035 label, a custom object's a subdomain.
_NAMES = {
    "Service": re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"),
    "HTTPRoute": re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"),
}

# A watch is ended after this long even if the client asked for more, as a real server does;
# the client watches again from the last resourceVersion it saw.
MAX_WATCH_SECONDS = 1800

STORE = web.AppKey("store", Store)
TOKEN = web.AppKey("token", str)


def name_hash(name: str) -> str:
    """agent-sandbox's NameHash: FNV-1a (32 bit) of the name, 8 hex digits; its pods carry it
    in the label `agents.x-k8s.io/sandbox-name-hash`."""
    value = 0x811C9DC5
    for byte in name.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{value:08x}"


def demo_objects(owner: str) -> list[tuple[Resource, dict]]:
    """The SandboxClaim `demo` and the Sandbox it created, as the agent-sandbox controller
    leaves them once the pod is ready, in the order they were created."""
    created = now()

    def metadata(**extra) -> dict:
        return {"name": SANDBOX_NAME, "namespace": SANDBOX_NAMESPACE, "uid": str(uuid.uuid4()),
                "creationTimestamp": created, "generation": 1, **extra}

    claim = {
        "apiVersion": CLAIMS.api_version, "kind": CLAIMS.kind,
        "metadata": metadata(annotations={OWNER_ANNOTATION: owner}),
        "spec": {"warmPoolRef": {"name": "python"}},
    }
    owner_ref = {"apiVersion": claim["apiVersion"], "kind": CLAIMS.kind, "name": SANDBOX_NAME,
                 "uid": claim["metadata"]["uid"], "controller": True}
    sandbox = {
        "apiVersion": SANDBOXES.api_version, "kind": SANDBOXES.kind,
        "metadata": metadata(ownerReferences=[owner_ref]),
        "spec": {"podTemplate": {"spec": {"containers": [{"name": "sandbox", "image": "sandgate-dev-demo"}]}}},
        # No serviceFQDN: with only a pod IP, nothing ever makes the gateway resolve a cluster name.
        "status": {
            "podIPs": [POD_IP],
            "selector": f"agents.x-k8s.io/sandbox-name-hash={name_hash(SANDBOX_NAME)}",  # a preview Service's
            "conditions": [{"type": "Ready", "status": "True", "reason": "DependenciesReady",
                            "message": "Pod is Ready", "lastTransitionTime": created}],
        },
    }
    return [(CLAIMS, claim), (SANDBOXES, sandbox)]


# --- requests ------------------------------------------------------------------------------------


def _resource(request: web.Request) -> tuple[Resource, str]:
    info = request.match_info
    resource = RESOURCES.get((info.get("group", ""), info["version"], info["plural"]))
    if resource is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return resource, info["namespace"]


def _writable(resource: Resource, namespace: str, request: web.Request) -> None:
    if not resource.writable:
        raise ApiError(405, "MethodNotAllowed", f"the dev stand-in does not {request.method} {resource.group_resource}")
    if namespace != SANDBOX_NAMESPACE:
        raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')


async def _json_object(request: web.Request, *, required: bool = True) -> dict:
    raw = await request.read()
    if not raw and not required:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, "BadRequest", f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the body must be a JSON object")
    return body


def _selector(request: web.Request) -> Selector:
    return label_selector(request.query.get("labelSelector", ""))


async def collection(request: web.Request) -> web.StreamResponse:
    resource, namespace = _resource(request)
    if request.method == "POST":
        return await create(request, resource, namespace)
    if request.method != "GET":
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {resource.group_resource}")
    selector = _selector(request)
    if request.query.get("watch", "").lower() in ("true", "1"):  # kubernetes-asyncio sends "True"
        return await watch(request, resource, namespace, selector)
    store = request.app[STORE]
    items = [obj for obj in store.items(resource, namespace) if selector(labels_of(obj))]
    return web.json_response({"apiVersion": resource.api_version, "kind": f"{resource.kind}List",
                              "metadata": {"resourceVersion": str(store.revision)}, "items": items})


async def item(request: web.Request) -> web.Response:
    resource, namespace = _resource(request)
    name = request.match_info["name"]
    store = request.app[STORE]
    if request.method not in ("GET", "PATCH", "DELETE"):
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {resource.group_resource}")
    if request.method != "GET":
        _writable(resource, namespace, request)
    current = store.get(resource, namespace, name)
    if current is None:
        raise not_found(resource, name)
    if request.method == "GET":
        return web.json_response(current)
    if request.method == "PATCH":
        return await patch(request, resource, current)
    options = await _json_object(request, required=False)  # DeleteOptions
    for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
        wanted, actual = (options.get("preconditions") or {}).get(field), current["metadata"][field]
        if wanted and wanted != actual:
            raise conflict(resource, name, f"Precondition failed: {label} in precondition: {wanted}, "
                                           f"{label} in object meta: {actual}")
    return web.json_response(store.remove(resource, current))


async def create(request: web.Request, resource: Resource, namespace: str) -> web.Response:
    _writable(resource, namespace, request)
    obj = await _json_object(request)
    if obj.setdefault("apiVersion", resource.api_version) != resource.api_version \
            or obj.setdefault("kind", resource.kind) != resource.kind:
        raise ApiError(400, "BadRequest", f"the body is a {obj['apiVersion']} {obj['kind']}, not a {resource.kind}")
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict) or meta.setdefault("namespace", namespace) != namespace:
        raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace of the request")
    name = meta.get("name")
    store = request.app[STORE]
    if isinstance(name, str) and store.get(resource, namespace, name) is not None:
        raise ApiError(409, "AlreadyExists", f'{resource.group_resource} "{name}" already exists')
    meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
    meta.pop("resourceVersion", None)
    if resource.group:
        meta["generation"] = 1
    _check(resource, obj)
    return web.json_response(store.put(resource, obj), status=201)


async def patch(request: web.Request, resource: Resource, current: dict) -> web.Response:
    if request.content_type != MERGE_PATCH:
        raise ApiError(415, "UnsupportedMediaType", f"the dev stand-in accepts {MERGE_PATCH} only")
    changes = await _json_object(request)
    obj = merge_patch(current, changes)
    meta, was = obj.get("metadata"), current["metadata"]
    name = was["name"]
    if not isinstance(meta, dict) or (meta.get("name"), meta.get("namespace")) != (name, was["namespace"]):
        raise ApiError(400, "BadRequest", "a patch cannot change the name or namespace")
    if meta.get("uid") != was["uid"]:
        raise conflict(resource, name, f"Precondition failed: UID in precondition: {meta.get('uid')}, "
                                       f"UID in object meta: {was['uid']}")
    if meta.get("resourceVersion") != was["resourceVersion"]:
        raise conflict(resource, name, "the object has been modified; please apply your changes to the latest "
                                       "version and try again")
    meta["creationTimestamp"] = was["creationTimestamp"]
    if "generation" in was:
        meta["generation"] = was["generation"] + (obj.get("spec") != current.get("spec"))
    _check(resource, obj)
    if obj == current:
        return web.json_response(current)  # a no-op writes nothing, as on a real server
    return web.json_response(request.app[STORE].put(resource, obj))


def _check(resource: Resource, obj: dict) -> None:
    """422 Invalid for what a real API server would refuse."""
    name = obj["metadata"].get("name")
    if not isinstance(name, str) or not _NAMES[resource.kind].fullmatch(name):
        raise ApiError(422, "Invalid", f"{resource.kind} {name!r} is invalid: metadata.name: Invalid value")
    if resource is HTTPROUTES:
        problems = [f"{format_path(e.json_path)}: {e.message}" for e in validate(obj)]
    else:  # a Service: only what previews rely on
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        ports = spec.get("ports")
        problems = []
        if not isinstance(ports, list) or not ports or not all(
                isinstance(p, dict) and isinstance(p.get("port"), int) and 0 < p["port"] < 65536 for p in ports):
            problems.append("spec.ports: Required value: ports 1-65535")
        selector = spec.get("selector", {})
        if not isinstance(selector, dict) or not all(isinstance(v, str) for v in selector.values()):
            problems.append("spec.selector: Invalid value: must map label names to strings")
    if problems:
        raise ApiError(422, "Invalid", f'{resource.kind} "{name}" is invalid: {"; ".join(problems)}')


async def watch(request: web.Request, resource: Resource, namespace: str, selector: Selector) -> web.StreamResponse:
    since = request.query.get("resourceVersion") or "0"
    timeout = request.query.get("timeoutSeconds", "")
    if not since.isdigit() or (timeout and not timeout.isdigit()):
        raise ApiError(400, "BadRequest", "resourceVersion and timeoutSeconds must be numbers")
    seconds = min(int(timeout) if timeout and int(timeout) > 0 else MAX_WATCH_SECONDS, MAX_WATCH_SECONDS)
    store = request.app[STORE]

    def seen(event: Event) -> tuple[str, dict] | None:
        """The event as this watch sees it: an object that starts matching is ADDED, one that
        stops is DELETED."""
        if event.resource is not resource or event.obj["metadata"]["namespace"] != namespace:
            return None
        matches = selector(labels_of(event.obj))
        matched = event.previous is not None and selector(labels_of(event.previous))
        if event.type == "MODIFIED" and matches != matched:
            return ("ADDED" if matches else "DELETED"), event.obj
        return (event.type, event.obj) if matches else None

    live = store.subscribe()  # before the backlog is read, with no await between: no gap
    try:
        expired = None
        if since == "0":
            backlog = [("ADDED", obj) for obj in store.items(resource, namespace) if selector(labels_of(obj))]
        else:
            try:
                backlog = [shown for event in store.events_after(int(since)) if (shown := seen(event))]
            except TooOld as e:
                backlog, expired = [], ApiError(410, "Expired", str(e))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for kind, obj in backlog:
            await response.write(_event_line(kind, obj))
        if expired is not None:
            await response.write(_event_line("ERROR", expired.status()))
            return response
        deadline = asyncio.get_running_loop().time() + seconds
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                event = await asyncio.wait_for(live.get(), left)
            except asyncio.TimeoutError:
                break
            if shown := seen(event):
                await response.write(_event_line(*shown))
        return response
    finally:
        store.unsubscribe(live)


def _event_line(kind: str, obj: dict) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


@web.middleware
async def api_server(request: web.Request, handler) -> web.StreamResponse:
    """The bearer token first; an ApiError becomes the metav1.Status a real server answers."""
    try:
        if request.headers.get("Authorization") != f"Bearer {request.app[TOKEN]}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.status(), status=e.code)


def make_app(owner: str, token: str) -> web.Application:
    """Serve it with handler cancellation on, so a watch ends when its client leaves."""
    app = web.Application(middlewares=[api_server])
    store = app[STORE] = Store()
    for resource, obj in demo_objects(owner):
        store.put(resource, obj)
    app[TOKEN] = token
    for prefix in ("/apis/{group}/{version}", "/api/{version}"):
        app.router.add_route("*", prefix + "/namespaces/{namespace}/{plural}", collection)
        app.router.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}", item)
    return app


def write_kubeconfig(path: str | Path, server: str, token: str, *, namespace: str = SANDBOX_NAMESPACE,
                     name: str = "sandgate-dev") -> Path:
    """A kubeconfig (token auth, no TLS: loopback only) pointing a client at this stand-in (or
    at the tests' API server double, which has its own name and default namespace)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
        "current-context": name,
    }
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
