"""Objects, the one resourceVersion counter they share, and the event history watches replay."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass

Key = tuple[str, str, str]  # (group_resource, namespace or "" when cluster-scoped, name)


@dataclass(frozen=True)
class Event:
    revision: int
    type: str  # ADDED, MODIFIED or DELETED
    resource: str  # ResourceType.group_resource
    obj: dict
    previous: dict | None  # the object before a MODIFIED: selectors need both sides

    @property
    def namespace(self) -> str:
        return self.obj["metadata"].get("namespace", "")


class TooOld(Exception):
    """A watch asked for history that compaction already dropped (a real server answers 410)."""

    def __init__(self, requested: int, oldest: int):
        super().__init__(f"too old resource version: {requested} ({oldest})")


class Store:
    """Plain storage: the registry decides what may be written, the store numbers and records it."""

    def __init__(self) -> None:
        self.revision = 0
        self.compacted = 0  # a watch may resume from this revision or any later one
        self._objects: dict[Key, dict] = {}
        self._keys_by_uid: dict[str, Key] = {}
        self._history: list[Event] = []
        self._subscribers: set[asyncio.Queue] = set()

    @staticmethod
    def key(resource: str, obj: dict) -> Key:
        metadata = obj["metadata"]
        return resource, metadata.get("namespace", ""), metadata["name"]

    def get(self, resource: str, namespace: str, name: str) -> dict | None:
        return self._objects.get((resource, namespace, name))

    def items(self, resource: str | None = None, namespace: str | None = None) -> list[tuple[str, dict]]:
        """(resource, object) pairs, ordered by namespace then name as etcd keys are."""
        return [
            (key[0], obj)
            for key, obj in sorted(self._objects.items(), key=lambda item: item[0][1:])
            if (resource is None or key[0] == resource) and (namespace is None or key[1] == namespace)
        ]

    def by_uid(self, uid: str) -> dict | None:
        key = self._keys_by_uid.get(uid)
        return self._objects[key] if key else None

    def write(self, resource: str, obj: dict) -> dict:
        """Store `obj` under a new resourceVersion; ADDED or MODIFIED depending on what was there."""
        key = self.key(resource, obj)
        previous = self._objects.get(key)
        stored = self._stamp(obj)
        self._objects[key] = stored
        self._keys_by_uid[stored["metadata"]["uid"]] = key
        self._record("MODIFIED" if previous else "ADDED", resource, stored, previous)
        return stored

    def remove(self, resource: str, obj: dict) -> dict:
        key = self.key(resource, obj)
        gone = self._stamp(self._objects.pop(key))  # a DELETED event carries the deletion's revision
        self._keys_by_uid.pop(gone["metadata"]["uid"], None)
        self._record("DELETED", resource, gone, None)
        return gone

    def _stamp(self, obj: dict) -> dict:
        self.revision += 1
        stamped = copy.deepcopy(obj)
        stamped["metadata"]["resourceVersion"] = str(self.revision)
        return stamped

    def _record(self, type_: str, resource: str, obj: dict, previous: dict | None) -> None:
        event = Event(self.revision, type_, resource, obj, previous)
        self._history.append(event)
        for queue in self._subscribers:
            queue.put_nowait(event)

    def events_after(self, revision: int) -> list[Event]:
        if revision < self.compacted:
            raise TooOld(revision, self.compacted)
        return [event for event in self._history if event.revision > revision]

    def compact(self) -> None:
        self._history.clear()
        self.compacted = self.revision

    def subscribe(self) -> asyncio.Queue:
        """Every event from now on, then None when the server goes away."""
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def end_subscriptions(self) -> None:
        for queue in self._subscribers:
            queue.put_nowait(None)
