"""The objects of the Kubernetes API stand-in (cluster.py): kept by kind, namespace and name,
versioned by one revision counter (etcd's, which every resourceVersion is), with the recent
history of changes for watches to replay and queues to stream the new ones.

Plain data, no HTTP: the stand-in's handlers turn `ApiError`s into metav1.Status replies.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

HISTORY = 1000  # events a watch can resume after; an older resourceVersion gets 410 Expired


@dataclass(frozen=True, slots=True)
class Resource:
    """A kind the stand-in serves. `writable`: created, patched and deleted by the gateway
    (previews); the others are the demo sandbox's and never change."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    writable: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


class ApiError(Exception):
    """What the API server would answer instead of an object (a metav1.Status)."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource.group_resource} "{name}" not found')


def conflict(resource: Resource, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource.group_resource} "{name}": {why}')


@dataclass(frozen=True, slots=True)
class Event:
    revision: int
    type: str  # ADDED, MODIFIED, DELETED
    resource: Resource
    obj: dict
    previous: dict | None  # the object before a MODIFIED: a watch with a selector needs both


class TooOld(Exception):
    """The history after this resourceVersion is no longer kept."""


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    def __init__(self, history: int = HISTORY) -> None:
        self.revision = 0
        self._objects: dict[tuple[Resource, str, str], dict] = {}
        self._history: deque[Event] = deque(maxlen=history)
        self._dropped_through = 0  # the revision of the newest event no longer in the history
        self._watchers: set[asyncio.Queue[Event]] = set()

    def get(self, resource: Resource, namespace: str, name: str) -> dict | None:
        return self._objects.get((resource, namespace, name))

    def items(self, resource: Resource, namespace: str) -> list[dict]:
        return [obj for (r, ns, _), obj in self._objects.items() if r is resource and ns == namespace]

    def put(self, resource: Resource, obj: dict) -> dict:
        """Store a new or changed object under the next revision and tell every watch."""
        meta = obj["metadata"]
        key = (resource, meta["namespace"], meta["name"])
        previous = self._objects.get(key)
        self.revision += 1
        meta["resourceVersion"] = str(self.revision)
        self._objects[key] = obj
        self._publish(Event(self.revision, "MODIFIED" if previous else "ADDED", resource, obj, previous))
        return obj

    def remove(self, resource: Resource, obj: dict) -> dict:
        """Delete the object; what is returned (and watched) carries the deletion's revision."""
        meta = obj["metadata"]
        del self._objects[(resource, meta["namespace"], meta["name"])]
        self.revision += 1
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self.revision)
        self._publish(Event(self.revision, "DELETED", resource, gone, None))
        return gone

    def events_after(self, revision: int) -> list[Event]:
        if revision < self._dropped_through:
            raise TooOld(f"too old resource version: {revision} ({self._dropped_through + 1})")
        return [event for event in self._history if event.revision > revision]

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._watchers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._watchers.discard(queue)

    def _publish(self, event: Event) -> None:
        if len(self._history) == self._history.maxlen:
            self._dropped_through = self._history[0].revision
        self._history.append(event)
        for queue in self._watchers:
            queue.put_nowait(event)


# --- label selectors -------------------------------------------------------------------------

Selector = Callable[[dict], bool]  # labels -> matches?

_KEY = r"(?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_TERM = re.compile(rf"(?P<not>!)?(?P<key>{_KEY})(?:(?P<op>==|=|!=)(?P<value>[A-Za-z0-9._-]*))?")


def label_selector(text: str) -> Selector:
    """Equality (`k=v`, `k==v`, `k!=v`) and existence (`k`, `!k`) terms, comma-separated.
    Set-based terms (`k in (a,b)`) are refused with a 400: no caller of the stand-in sends them."""
    tests: list[Selector] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = _TERM.fullmatch(term)
        if m is None or (m["not"] and m["op"]):
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term} (the dev stand-in takes "
                                              "equality and existence terms only)")
        key, op, value = m["key"], m["op"], m["value"]
        if m["not"]:
            tests.append(lambda labels, key=key: key not in labels)
        elif op is None:
            tests.append(lambda labels, key=key: key in labels)
        elif op == "!=":
            tests.append(lambda labels, key=key, value=value: labels.get(key) != value)
        else:
            tests.append(lambda labels, key=key, value=value: labels.get(key) == value)
    return lambda labels: all(test(labels) for test in tests)


def labels_of(obj: dict) -> dict:
    return obj["metadata"].get("labels") or {}


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged
