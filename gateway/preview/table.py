"""Every live preview, by host: kept from a watch of preview HTTPRoutes (SPEC §5).

Serving a preview host is a dictionary lookup, whatever the number of previews. A replica that
has not seen the watch event yet for a new preview looks its HTTPRoute up once; misses are
remembered for a few seconds, concurrent requests for one host share one lookup, and all lookups
together draw on one budget (a token bucket per replica): whatever hosts are sent, the API
server sees at most LOOKUP_RATE GETs a second (after a burst of LOOKUP_BURST). Over budget a host
is answered as unknown without a lookup; a preview created on another replica a moment ago is
still served as soon as the watch delivers it (about a second), and the creating replica serves
it at once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from time import monotonic
from typing import Callable

from gateway.kube import HTTPROUTE, KubeClient, KubeError, WatchedKind
from gateway.preview.objects import SELECTOR, Preview, from_httproute
from gateway.preview.tokens import object_name

MISS_SECONDS = 5.0
MAX_MISSES = 4096  # hosts are a 34-character label plus the zone: a few hundred KiB at most
LOOKUP_RATE = 5.0  # API GETs per second for hosts not in the table, all hosts together
LOOKUP_BURST = 10


class LookupBudget:
    """A token bucket: `take()` is True while GETs are left."""

    def __init__(self, rate: float = LOOKUP_RATE, burst: int = LOOKUP_BURST):
        self.rate, self.burst = rate, float(burst)
        self._tokens = float(burst)
        self._at = monotonic()

    def take(self) -> bool:
        now = monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class PreviewTable:
    def __init__(self, kube: KubeClient, on_change: Callable[[], None] | None = None):
        self.kube = kube
        self.by_host: dict[str, Preview] = {}
        self._by_token: dict[str, Preview] = {}
        self._watches: dict[str, WatchedKind] = {}
        self._misses: OrderedDict[str, float] = OrderedDict()  # host -> monotonic deadline
        self._budget = LookupBudget()
        # host -> the one lookup under way; at most LOOKUP_BURST + LOOKUP_RATE * (API latency)
        # entries, since each holds a GET of the budget. Results are plain values, never errors.
        self._lookups: dict[str, asyncio.Task] = {}
        self._on_change = on_change

    def watch_namespaces(self, namespaces: set[str]) -> None:
        for namespace in namespaces - self._watches.keys():
            watched = WatchedKind(self.kube, HTTPROUTE, namespace, self._changed, label_selector=SELECTOR)
            self._watches[namespace] = watched
            watched.start()
        for namespace in self._watches.keys() - namespaces:
            asyncio.get_running_loop().create_task(self._watches.pop(namespace).stop())
            for preview in [p for p in self.by_host.values() if p.namespace == namespace]:
                self.forget(preview)

    @property
    def namespaces(self) -> set[str]:
        return set(self._watches)

    def synced(self) -> bool:
        return all(w.synced.is_set() for w in self._watches.values())

    async def wait_synced(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.gather(*(w.synced.wait() for w in self._watches.values())), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _changed(self, event: str, route: dict) -> None:
        preview = from_httproute(route)
        if preview is None:
            return
        if event == "DELETED":
            self.forget(preview)
        else:
            self.put(preview)
        if self._on_change is not None:
            self._on_change()

    def put(self, preview: Preview) -> None:
        self.by_host[preview.host] = preview
        self._by_token[preview.token] = preview
        self._misses.pop(preview.host, None)

    def forget(self, preview: Preview) -> None:
        current = self.by_host.get(preview.host)
        if current is not None and current.token == preview.token:
            del self.by_host[preview.host]
            self._by_token.pop(preview.token, None)

    def previews(self) -> list[Preview]:
        return list(self.by_host.values())

    def count(self, namespace: str | None = None, sandbox: str | None = None) -> int:
        if namespace is None:
            return len(self.by_host)
        return sum(1 for p in self.by_host.values() if p.namespace == namespace and p.sandbox == sandbox)

    def count_owned(self, owner: str) -> int:
        return sum(1 for p in self.by_host.values() if p.owner == owner)

    def by_token(self, token: str) -> Preview | None:
        return self._by_token.get(token)

    async def lookup(self, host: str, token: str) -> Preview | None:
        """The preview of `host`: from the table, else (once per few seconds per host, within
        the replica's budget) from the API server, for a preview created on another replica a
        moment ago."""
        preview = self.by_host.get(host)
        if preview is not None:
            return preview
        running = self._lookups.get(host)
        if running is None:
            now = monotonic()
            deadline = self._misses.get(host)
            if deadline is not None and deadline > now:
                return None
            if not self._watches or not self._budget.take():
                return None
            self._remember_miss(host, now)
            running = self._lookups[host] = asyncio.get_running_loop().create_task(self._fetch(host, token))
            running.add_done_callback(lambda _task: self._lookups.pop(host, None))
        # shielded: a client that goes away does not cancel the lookup the others wait for
        return await asyncio.shield(running)

    async def _fetch(self, host: str, token: str) -> Preview | None:
        """One GET per namespace the previews may live in; every GET after the first draws on
        the budget too."""
        for i, namespace in enumerate(sorted(self._watches)):
            if i and not self._budget.take():
                return None
            try:
                route = await self.kube.get(HTTPROUTE, namespace, object_name(token))
            except KubeError:
                return None
            found = from_httproute(route) if route is not None else None
            if found is not None and found.host == host:
                self.put(found)
                return found
        return None

    def _remember_miss(self, host: str, now: float) -> None:
        self._misses[host] = now + MISS_SECONDS
        self._misses.move_to_end(host)
        while len(self._misses) > MAX_MISSES:
            self._misses.popitem(last=False)

    async def stop(self) -> None:
        watches = list(self._watches.values())
        self._watches.clear()
        await asyncio.gather(*(w.stop() for w in watches))
