"""A live local copy of one kind of object in one namespace (an informer, in client-go terms).

List, then watch from the list's resourceVersion; on `410 Gone` list again; on any other error
back off and retry while the last copy keeps serving. Readers look objects up in a dict and
never wait for the API server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import aiohttp
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client.exceptions import ApiException

from gateway.kube.client import Kind, KubeClient, KubeError

log = logging.getLogger("sandgate.kube")

OnChange = Callable[[str, dict], None]  # ("ADDED" | "MODIFIED" | "DELETED", object)

# A watch is re-opened this often even when healthy: an idle connection a middlebox dropped
# silently would otherwise leave the copy stale forever.
WATCH_SECONDS = 240
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0


class WatchedKind:
    def __init__(self, client: KubeClient, kind: Kind, namespace: str, on_change: OnChange | None = None,
                 label_selector: str | None = None):
        self.client = client
        self.kind = kind
        self.namespace = namespace
        self.label_selector = label_selector
        self.objects: dict[str, dict] = {}  # name -> object
        self.synced = asyncio.Event()  # set once the first list arrived
        self.connected = False  # False while the API server cannot be reached
        self.relists = 0
        self._on_change = on_change
        self._resource_version: str | None = None
        self._task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"<WatchedKind {self.kind.kind} in {self.namespace}>"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=repr(self))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            try:
                if self._resource_version is None:
                    await self._relist()
                await self._watch()
                delay = BACKOFF_FIRST
            except KubeError as e:
                if e.gone:
                    log.info("%r: resourceVersion too old, listing again", self)
                    self._resource_version = None
                    continue
                delay = await self._back_off(e, delay)
            except ApiException as e:
                if e.status == 410:
                    self._resource_version = None
                    continue
                delay = await self._back_off(e, delay)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
                delay = await self._back_off(e, delay)
            except Exception as e:  # noqa: BLE001 - e.g. a reply that is not a stream of events:
                # the copy must keep being refreshed, never die silently with its task
                log.exception("%r: unexpected error; retrying", self)
                delay = await self._back_off(e, delay)

    async def _back_off(self, error: Exception, delay: float) -> float:
        if self.connected:
            log.warning("%r: %s; keeping the last copy and retrying", self, error or type(error).__name__)
        self.connected = False
        await asyncio.sleep(delay)
        return min(delay * 2, BACKOFF_MAX)

    async def _relist(self) -> None:
        listed = await self.client.list(self.kind, self.namespace, self.label_selector)
        fresh = {item["metadata"]["name"]: item for item in listed.get("items") or ()}
        old = self.objects
        self.objects = fresh
        self._resource_version = listed.get("metadata", {}).get("resourceVersion")
        self.relists += 1
        self.connected = True
        self.synced.set()
        if self._on_change is not None:
            for name, obj in old.items():
                if name not in fresh:
                    self._on_change("DELETED", obj)
            for name, obj in fresh.items():
                self._on_change("MODIFIED" if name in old else "ADDED", obj)

    async def _watch(self) -> None:
        function, args = self.client.watch_function(self.kind)
        if self.kind.group:
            args = (*args, self.namespace, self.kind.plural)
        else:
            args = (self.namespace,)
        selector = {"label_selector": self.label_selector} if self.label_selector else {}
        watch = k8s_watch.Watch()
        # With timeout_seconds the library neither retries a 410 silently nor reconnects on
        # its own: both are decided here, where the copy is kept.
        stream = watch.stream(
            function, *args, resource_version=self._resource_version, timeout_seconds=WATCH_SECONDS,
            allow_watch_bookmarks=True, _request_timeout=WATCH_SECONDS + 30, **selector,
        )
        try:
            async for event in stream:
                self.connected = True
                kind = event["type"]
                obj = event["raw_object"]
                version = obj.get("metadata", {}).get("resourceVersion")
                if version:
                    self._resource_version = version
                if kind == "BOOKMARK":
                    continue
                name = obj["metadata"]["name"]
                if kind == "DELETED":
                    self.objects.pop(name, None)
                else:
                    self.objects[name] = obj
                if self._on_change is not None:
                    self._on_change(kind, obj)
        finally:
            await watch.close()
