"""The aiohttp app: the request log, errors as Status bodies, authentication, then the verbs.

Resolving a path is a pure function (paths.py) and the verb semantics live in the registry:
the handlers here only read the request and write the response.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import WSCloseCode, web
from multidict import CIMultiDict

from . import discovery
from .catalog import Catalog, ResourceType
from .exec import Shells, serve_exec
from .faults import Faults
from .paths import DiscoveryPath, ResourcePath, parse_path
from .query import choice, flag, integer
from .registry import Registry
from .selectors import parse_field_selector, parse_label_selector
from .status import (
    ApiError,
    bad_request,
    deleted,
    expired,
    internal_error,
    method_not_allowed,
    path_not_found,
    unauthorized,
)
from .validation import FIELD_VALIDATION_MODES
from .watch import Selection, WatchOptions, stream_watch

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """Everything the handlers share; it outlives the app, so a restart keeps it."""

    catalog: Catalog
    registry: Registry
    token: str
    requests: list[tuple[str, str]]
    faults: Faults
    shells: Shells
    sockets: weakref.WeakSet  # open exec WebSockets, closed when the API goes away
    bookmark_interval: float
    address: str = ""  # host:port, for discovery


STATE = web.AppKey("kube_api_state", ServerState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[record_request, answer_errors, authenticate], client_max_size=3 * 2**20)
    app[STATE] = state
    app.router.add_route("*", "/{path:.*}", dispatch)
    app.on_shutdown.append(going_away)
    return app


async def going_away(app: web.Application) -> None:
    """The listener is closed already; end the streams, so that shutdown need not wait for them."""
    state = app[STATE]
    state.registry.store.end_subscriptions()
    sockets = list(state.sockets)
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY) for ws in sockets), return_exceptions=True)


# ----- middlewares, outermost first


@web.middleware
async def record_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    request.app[STATE].requests.append((request.method, request.path_qs))
    return await handler(request)


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return _status_response(error.status)
    except web.HTTPException:
        raise
    except Exception as error:  # a bug in the double: answer as the server would, and say so in the log
        log.exception("kube API double failed on %s %s", request.method, request.path_qs)
        return _status_response(internal_error(f"{type(error).__name__}: {error}").status)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.headers.get("Authorization") != f"Bearer {request.app[STATE].token}":
        raise unauthorized()
    return await handler(request)


# ----- routing


async def dispatch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    target = parse_path(request.path)
    if isinstance(target, DiscoveryPath):
        if request.method != "GET":
            raise method_not_allowed()
        return _json(discovery.answer(state.catalog, target, state.address))
    if target is None:
        raise path_not_found()
    if fault := state.faults.take(request.method, target.plural):
        return _status_response(fault)
    rtype = state.catalog.resolve(target.group, target.version, target.plural)
    if rtype is None or not _in_scope(rtype, target):
        raise path_not_found()
    return await _verb(request, target)(request, state, rtype, target)


def _in_scope(rtype: ResourceType, target: ResourcePath) -> bool:
    if not rtype.namespaced:
        return target.namespace is None
    return target.namespace is not None or target.name is None  # all-namespaces lists only


def _verb(request: web.Request, target: ResourcePath) -> Callable[..., Awaitable[web.StreamResponse]]:
    method, sub = request.method, target.subresource
    if target.name is None:
        table = {"GET": list_or_watch, "POST": create, "DELETE": delete_collection}
    elif sub is None:
        table = {"GET": get, "PUT": replace, "PATCH": patch, "DELETE": delete}
    elif sub == "status":
        table = {"GET": get, "PUT": replace, "PATCH": patch}
    elif sub == "exec" and target.plural == "pods" and target.group == "":
        table = {"GET": exec_in_pod, "POST": exec_in_pod}
    else:
        raise path_not_found()
    if method not in table:
        raise method_not_allowed()
    return table[method]


# ----- handlers


async def list_or_watch(request: web.Request, state: ServerState, rtype: ResourceType, target: ResourcePath):
    query = request.query
    labels = parse_label_selector(query.get("labelSelector"))
    fields = parse_field_selector(query.get("fieldSelector"), rtype.field_labels)
    if flag(query, "watch"):
        selection = Selection(rtype, target.version, target.namespace, labels, fields)
        timeout = integer(query, "timeoutSeconds")
        options = WatchOptions(
            resource_version=query.get("resourceVersion", ""),
            timeout_seconds=timeout if timeout and timeout > 0 else None,
            bookmarks=flag(query, "allowWatchBookmarks"),
            bookmark_interval=state.bookmark_interval,
        )
        return await stream_watch(request, state.registry, selection, options)
    items = state.registry.list(rtype, target.version, target.namespace, labels, fields)
    metadata = {"resourceVersion": str(state.registry.store.revision)}
    items = _page(state, items, metadata, integer(query, "limit"), query.get("continue"))
    if rtype.builtin:
        items = [{k: v for k, v in item.items() if k not in ("apiVersion", "kind")} for item in items]
    body = {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version(target.version), "metadata": metadata}
    body["items"] = items
    return _json(body)


def _page(state: ServerState, items: list[dict], metadata: dict, limit: int | None, token: str | None) -> list[dict]:
    """limit/continue: the token names the last object returned; it expires with compaction."""
    def position(item: dict) -> list[str]:
        return [item["metadata"].get("namespace", ""), item["metadata"]["name"]]

    if token:
        try:
            resumed = json.loads(base64.urlsafe_b64decode(token))
            revision, after = int(resumed["rv"]), list(resumed["start"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise bad_request("continue key is not valid: malformed continue token") from None
        if revision < state.registry.store.compacted:
            raise ApiError(expired(
                "The provided continue parameter is too old to display a consistent list result. "
                "You can start a new list without the continue parameter."
            ))
        metadata["resourceVersion"] = str(revision)
        items = [item for item in items if position(item) > after]
    if limit and limit > 0 and len(items) > limit:
        last = {"rv": int(metadata["resourceVersion"]), "start": position(items[limit - 1])}
        metadata["continue"] = base64.urlsafe_b64encode(json.dumps(last).encode()).decode()
        metadata["remainingItemCount"] = len(items) - limit
        items = items[:limit]
    return items


async def get(request: web.Request, state: ServerState, rtype: ResourceType, target: ResourcePath):
    _check_subresource(rtype, target)
    return _json(state.registry.get(rtype, target.version, target.namespace, target.name))


async def create(request: web.Request, state: ServerState, rtype: ResourceType, target: ResourcePath):
    if rtype.namespaced and target.namespace is None:
        raise method_not_allowed()
    written = state.registry.create(
        rtype, target.version, target.namespace, await _json_body(request), **_write_options(request)
    )
    return _json(written.obj, status=201, headers=_warnings(written.warnings))


async def replace(request: web.Request, state: ServerState, rtype: ResourceType, target: ResourcePath):
    _check_subresource(rtype, target)
    written = state.registry.replace(
        rtype, target.version, target.namespace, target.name, await _json_body(request),
        subresource=target.subresource, **_write_options(request),
    )
    return _json(written.obj, headers=_warnings(written.warnings))


async def patch(request: web.Request, state: ServerState, rtype: ResourceType, target: ResourcePath):
    _check_subresource(rtype, target)
    written = state.registry.patch(
        rtype, target.version, target.namespace, target.name, request.content_type, await request.read(),
        subresource=target.subresource, **_write_options(request),
    )
    return _json(written.obj, headers=_warnings(written.warnings))


async def delete(request: web.Request, state: ServerState, rtype: ResourceType, target: ResourcePath):
    options = await _delete_options(request)
    obj, gone = state.registry.delete(rtype, target.version, target.namespace, target.name, **options)
    # 200 even when finalizers keep the object: the server keeps 202 for a legacy option only.
    return _json(deleted(rtype, obj) if gone and not rtype.returns_deleted_object else obj)


async def delete_collection(request: web.Request, state: ServerState, rtype: ResourceType, target: ResourcePath):
    options = await _delete_options(request)
    labels = parse_label_selector(request.query.get("labelSelector"))
    fields = parse_field_selector(request.query.get("fieldSelector"), rtype.field_labels)
    chosen = state.registry.list(rtype, target.version, target.namespace, labels, fields)
    items = []
    for obj in chosen:
        metadata = obj["metadata"]
        namespace = metadata.get("namespace")
        items.append(state.registry.delete(rtype, target.version, namespace, metadata["name"], **options)[0])
    metadata = {"resourceVersion": str(state.registry.store.revision)}
    body = {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version(target.version), "metadata": metadata}
    body["items"] = items
    return _json(body)


async def exec_in_pod(request: web.Request, state: ServerState, rtype: ResourceType, target: ResourcePath):
    pod = state.registry.get(rtype, target.version, target.namespace, target.name)
    shell = state.shells.for_pod(target.namespace, target.name)
    return await serve_exec(request, pod, shell, state.sockets)


# ----- request details


def _check_subresource(rtype: ResourceType, target: ResourcePath) -> None:
    if target.subresource == "status" and not rtype.has_status(target.version):
        raise path_not_found()


async def _json_body(request: web.Request) -> object:
    try:
        return json.loads(await request.read() or b"null")
    except ValueError as error:
        raise bad_request(f"couldn't get version/kind; json parse error: {error}") from None


def _write_options(request: web.Request) -> dict:
    query = request.query
    dry_run = query.getall("dryRun", [])
    if any(value != "All" for value in dry_run):
        raise bad_request(f'dryRun: Unsupported value: "{dry_run}": supported values: "All"')
    return {
        "field_validation": choice(query, "fieldValidation", FIELD_VALIDATION_MODES, "Warn"),
        "dry_run": bool(dry_run),
    }


async def _delete_options(request: web.Request) -> dict:
    """DeleteOptions from the body (kubernetes-asyncio sends one) or the query."""
    body = await _json_body(request) if request.can_read_body else None
    body = body if isinstance(body, dict) else {}
    propagation = request.query.get("propagationPolicy") or body.get("propagationPolicy")
    orphan = request.query.get("orphanDependents") or body.get("orphanDependents")
    if propagation is None and orphan is not None:
        propagation = "Orphan" if str(orphan).lower() == "true" else "Background"
    if propagation not in (None, "Background", "Foreground", "Orphan"):
        supported = '"Foreground", "Background", "Orphan"'
        raise bad_request(f'propagationPolicy: Unsupported value: "{propagation}": supported values: {supported}')
    return {
        "propagation": propagation or "Background",
        "preconditions": body.get("preconditions") or {},
        "dry_run": _write_options(request)["dry_run"] or "All" in (body.get("dryRun") or []),
    }


def _warnings(warnings: list[str]) -> CIMultiDict:
    headers: CIMultiDict = CIMultiDict()
    for warning in warnings:
        headers.add("Warning", '299 - "' + warning.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return headers


def _status_response(status: dict) -> web.Response:
    return _json(status, status=status["code"])


def _json(body: object, *, status: int = 200, headers: CIMultiDict | None = None) -> web.Response:
    # Compact, as the Go server writes it: byte-exact assertions then hold for both.
    return web.json_response(body, status=status, headers=headers, dumps=_compact)


def _compact(body: object) -> str:
    return json.dumps(body, separators=(",", ":"))
