"""Watch streams: chunked JSON lines of ADDED/MODIFIED/DELETED/BOOKMARK/ERROR events.

A watch starts from a resourceVersion: unset or "0" replays the current objects as synthetic
ADDED events; "N" replays the recorded history after N (410 Expired once compacted away).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from aiohttp import web

from .catalog import ResourceType
from .registry import Registry
from .selectors import FieldSelector, LabelSelector
from .status import bad_request, expired
from .store import Event, TooOld


@dataclass(frozen=True)
class Selection:
    """Which objects one watch sees, and how an event looks through it."""

    rtype: ResourceType
    version: str
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector

    def matches(self, obj: dict) -> bool:
        in_scope = self.namespace is None or obj["metadata"].get("namespace") == self.namespace
        return in_scope and self.labels.matches(obj["metadata"].get("labels")) and self.fields.matches(obj)

    def translate(self, event: Event) -> tuple[str, dict] | None:
        """An object that starts matching is ADDED for this watcher, one that stops is DELETED."""
        if event.resource != self.rtype.group_resource:
            return None
        now = self.matches(event.obj)
        before = event.previous is not None and self.matches(event.previous)
        if event.type == "MODIFIED" and now != before:
            return ("ADDED" if now else "DELETED"), event.obj
        return (event.type, event.obj) if now else None


@dataclass(frozen=True)
class WatchOptions:
    resource_version: str
    timeout_seconds: float | None
    bookmarks: bool
    bookmark_interval: float


async def stream_watch(
    request: web.Request, registry: Registry, selection: Selection, options: WatchOptions
) -> web.StreamResponse:
    store = registry.store
    # Subscribe and read the backlog with no await between: no event can fall in the gap.
    live = store.subscribe()
    try:
        try:
            backlog = _backlog(registry, selection, options.resource_version)
            failure = None
        except TooOld as too_old:
            backlog, failure = [], expired(str(too_old))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for type_, obj in backlog:
            await _send(response, registry, selection, type_, obj)
        if failure:
            await response.write(_line({"type": "ERROR", "object": failure}))
            return response
        await _follow(response, registry, selection, options, live)
        return response
    finally:
        store.unsubscribe(live)


def _backlog(registry: Registry, selection: Selection, resource_version: str) -> list[tuple[str, dict]]:
    if resource_version in ("", "0"):
        everything = registry.store.items(selection.rtype.group_resource)
        return [("ADDED", obj) for _, obj in everything if selection.matches(obj)]
    if not resource_version.isdigit():
        raise bad_request(f'resourceVersion: Invalid value: "{resource_version}": must be a number')
    translated = (selection.translate(event) for event in registry.store.events_after(int(resource_version)))
    return [event for event in translated if event]


async def _follow(
    response: web.StreamResponse, registry: Registry, selection: Selection, options: WatchOptions, live: asyncio.Queue
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.timeout_seconds if options.timeout_seconds else float("inf")
    next_bookmark = loop.time() + options.bookmark_interval if options.bookmarks else float("inf")
    while True:
        wait = min(deadline, next_bookmark) - loop.time()
        if wait <= 0:
            if loop.time() >= deadline:
                return  # timeoutSeconds: the server ends the stream cleanly
            await response.write(_line(_bookmark(selection, registry.store.revision)))
            next_bookmark = loop.time() + options.bookmark_interval
            continue
        try:
            event = await asyncio.wait_for(live.get(), timeout=None if wait == float("inf") else wait)
        except TimeoutError:
            continue
        if event is None:
            return  # the server is going away
        if translated := selection.translate(event):
            await _send(response, registry, selection, *translated)


async def _send(response: web.StreamResponse, registry: Registry, selection: Selection, type_: str, obj: dict) -> None:
    shown = registry.present(selection.rtype, selection.version, obj)
    await response.write(_line({"type": type_, "object": shown}))


def _bookmark(selection: Selection, revision: int) -> dict:
    """Only kind, apiVersion and the resourceVersion: a client resumes from it."""
    rtype = selection.rtype
    shown = {"kind": rtype.kind, "apiVersion": rtype.api_version(selection.version)}
    return {"type": "BOOKMARK", "object": {**shown, "metadata": {"resourceVersion": str(revision)}}}


def _line(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"
