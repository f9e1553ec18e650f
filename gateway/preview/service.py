"""Previews (SPEC §5): create, serve, keep alive, delete and reap.

Cluster state is the truth: a preview exists while its HTTPRoute does, and every decision about
its lifetime reads the annotations on it. Any number of replicas can therefore create, extend
and reap previews without talking to each other.

What a preview serves ends with it: every request to a preview host is remembered (weakly) by
its preview, and when the preview leaves the table (deleted here or elsewhere, reaped) or its
time is up, the requests still running, WebSockets and streamed responses, are cancelled within
CLOSE_INTERVAL: a WebSocket gets 1001, a stream is cut. An open one counts as traffic meanwhile.
With `accessMode: owner` the same happens to one caller's requests when they may no longer reach
the sandbox (taken off `shared-with`, the owner changed).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from time import time
from typing import Callable

from gateway.audit import AuditLog, AuditRecord
from gateway.config.model import PreviewZone, Upstream
from gateway.kube import HTTPROUTE, SERVICE, KubeClient, KubeError
from gateway.policy.model import SandboxPolicy
from gateway.periodic import every
from gateway.preview import objects
from gateway.preview.caps import PreviewCaps
from gateway.preview.objects import Preview
from gateway.preview.table import PreviewTable
from gateway.preview.tokens import new_token, object_name
from gateway.sandbox.access import DEFAULT_POLICY, relation
from gateway.sandbox.registry import SandboxInfo, SandboxRegistry
from gateway.refusal import Refusal
from gateway.sandbox.router import SandboxAccess, SandboxTarget

log = logging.getLogger("sandgate.preview")

CLOSE_INTERVAL = 0.25  # seconds between looks for streams whose preview is gone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Previews:
    def __init__(self, kube: KubeClient, table: PreviewTable, registry: SandboxRegistry, sandboxes: SandboxAccess,
                 audit: AuditLog, *, on_reaped: Callable[[str], None] = lambda reason: None,
                 reap_interval: float = 30.0, touch_interval: float = 60.0):
        self.kube = kube
        self.table = table
        self.registry = registry
        self.sandboxes = sandboxes
        self.audit = audit
        self.on_reaped = on_reaped
        self.reap_interval = reap_interval
        self.touch_interval = touch_interval
        self._extending: set[str] = set()
        self.caps = PreviewCaps()
        self._upstreams: dict[tuple, Upstream] = {}
        self._tasks: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        self._closer: asyncio.Task | None = None
        # token -> (its zone, the requests to it still running -> (claims, policy) of their
        # caller in owner mode, else None). An entry per live preview at most (dropped when it
        # ends or has nothing running); tasks are held weakly.
        self._running: dict[str, tuple[PreviewZone, weakref.WeakKeyDictionary[asyncio.Task, tuple | None]]] = {}

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())
            self._closer = asyncio.get_running_loop().create_task(self._close_forever())

    async def stop(self) -> None:
        tasks = [t for t in (self._reaper, self._closer, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._reaper = self._closer = None

    # --- serving ----------------------------------------------------------------------------

    async def target(self, zone: PreviewZone, host: str, token: str, path: str, claims, policy: SandboxPolicy | None) -> SandboxTarget:
        preview = await self.table.lookup(host, token)
        now = time()
        if preview is None or now >= preview.expires_ts or now >= preview.max_ts:
            raise Refusal(404, "preview_not_found", "No preview at this host.")
        info = self.sandbox_of(preview)
        if info is None:
            raise Refusal(404, "preview_not_found", "No preview at this host.")
        if zone.access_mode == "owner":
            if claims is None:
                raise Refusal(401, "unauthorized", "Sign in to open this preview.", {"WWW-Authenticate": 'Bearer realm="sandgate"'})
            if relation(info, claims, policy or DEFAULT_POLICY) is None:
                raise Refusal(404, "preview_not_found", "No preview at this host.")
        self.touch(preview, zone, now)
        self._remember_running(preview.token, zone, (claims, policy) if zone.access_mode == "owner" else None)
        return SandboxTarget(await self._upstream(preview, info), path, None, ("sandbox", preview.namespace, preview.sandbox),
                             isolate=True)

    async def _upstream(self, preview: Preview, info: SandboxInfo) -> Upstream:
        """The preview's upstream, made once per preview and observed sandbox state (a Service
        name's resolved address is not kept here: the resolution has its own expiry)."""
        key = (preview.token, preview.port, info)
        upstream = self._upstreams.get(key)
        if upstream is None:
            endpoint, keep = await self.sandboxes.pod_endpoint(info, preview.port)
            upstream = Upstream(f"Preview {preview.fingerprint}", (endpoint,))
            if keep:
                if len(self._upstreams) >= 20_000:
                    self._upstreams.clear()
                self._upstreams[key] = upstream
        return upstream

    def touch(self, preview: Preview, zone: PreviewZone, now: float) -> None:
        """Real traffic extends the idle TTL; at most one API write per preview per
        `touch_interval`, judged on the expiry the cluster holds, so replicas agree."""
        wanted = min(now + zone.idle_ttl, preview.max_ts)
        if wanted - preview.expires_ts < min(self.touch_interval, zone.idle_ttl / 2) or preview.token in self._extending:
            return
        self._extending.add(preview.token)
        self._spawn(self._extend(preview, datetime.fromtimestamp(wanted, timezone.utc), event=None))

    async def _extend(self, preview: Preview, expires: datetime, event: str | None) -> Preview:
        try:
            patch = {"metadata": {"annotations": {objects.EXPIRES_AT: objects.rfc3339(expires)}}}
            await self.kube.merge_patch(HTTPROUTE, preview.namespace, object_name(preview.token), patch)
            extended = replace(preview, expires_at=expires)
            self.table.put(extended)
            if event:
                self._record(event, extended)
            return extended
        except KubeError as e:
            # status and reason only: the API server's message names the object, token and all
            log.warning("preview %s: could not extend: %s %s", preview.fingerprint, e.status, e.reason)
            raise
        finally:
            self._extending.discard(preview.token)

    def _remember_running(self, token: str, zone: PreviewZone, caller: tuple | None) -> None:
        """The current request (the task serving it) runs for the preview `token`, for `caller`
        ((claims, policy)) when only who may reach the sandbox may use it."""
        entry = self._running.get(token)
        if entry is None:
            entry = self._running[token] = (zone, weakref.WeakKeyDictionary())
        entry[1][asyncio.current_task()] = caller

    def _end_running(self, token: str, reason: str) -> int:
        """Cancel what still runs for `token`: a relayed WebSocket closes with 1001, a streamed
        response is cut with its connection."""
        _, tasks = self._running.pop(token, (None, ()))
        ended = 0
        for task in list(tasks):
            if not task.done():
                task.cancel(reason)
                ended += 1
        return ended

    def close_ended(self) -> None:
        """End the streams of previews that left the table or whose time is up, and those of
        callers who may no longer reach the sandbox; an open stream of a live preview counts as
        traffic (it extends the idle TTL, debounced as usual)."""
        now = time()
        for token, (zone, tasks) in list(self._running.items()):
            preview = self.table.by_token(token)
            if preview is None or now >= preview.expires_ts or now >= preview.max_ts:
                self._end_running(token, "preview ended")
                continue
            info = self.sandbox_of(preview)
            running = 0
            for task, caller in list(tasks.items()):
                if task.done():
                    continue
                if caller is not None and (info is None or relation(info, caller[0], caller[1] or DEFAULT_POLICY) is None):
                    task.cancel("access to the sandbox ended")
                    continue
                running += 1
            if running:
                self.touch(preview, zone, now)
            else:
                del self._running[token]

    async def _close_forever(self) -> None:
        async def close_round() -> None:
            self.close_ended()

        await every(CLOSE_INTERVAL, close_round, log, "closing the streams of ended previews failed")

    # --- the API's operations -----------------------------------------------------------------

    def sandbox_for(self, namespace: str, name: str, claims, policy: SandboxPolicy | None) -> SandboxInfo:
        """The sandbox the caller may reach, else Refusal(404)."""
        info = self.registry.find(namespace, name)
        if info is None or claims is None or relation(info, claims, policy or DEFAULT_POLICY) is None:
            raise Refusal(404, "sandbox_not_found", f"No sandbox {name} in namespace {namespace}.")
        return info

    def check_request(self, info: SandboxInfo, port: int, policy: SandboxPolicy | None) -> None:
        """Refusal when the policy forbids a preview of this sandbox's port at all. The caps are
        checked by `create`, which reserves its place under them."""
        policy = policy or DEFAULT_POLICY
        low, high = policy.preview_ports
        if not low <= port <= high:
            raise Refusal(400, "port_not_allowed", f"Previews are allowed for ports {low}-{high} only.")
        if not info.ready:
            raise Refusal(409, "sandbox_not_ready", f"Sandbox {info.namespace}/{info.name} is not ready: {info.not_ready_reason}")

    async def create(self, zone: PreviewZone, info: SandboxInfo, port: int, owner: str,
                     policy: SandboxPolicy | None) -> Preview:
        """Service first, then HTTPRoute; when the HTTPRoute cannot be created the Service is
        deleted again, so a failure leaves nothing behind. The preview's place under the caps
        is reserved before the first API call and held until it is in the table."""
        if not info.pod_selector:
            raise Refusal(409, "sandbox_not_ready", f"Sandbox {info.namespace}/{info.name} has no pod selector yet.")
        # Shielded: a client that goes away mid-way cancels its request, not the create, so the
        # Service is never left without its HTTPRoute (or rolled back) and the reserved place is
        # held until the preview is in the table.
        return await asyncio.shield(self._reserve_and_create(zone, info, port, owner, policy))

    async def _reserve_and_create(self, zone: PreviewZone, info: SandboxInfo, port: int, owner: str,
                                  policy: SandboxPolicy | None) -> Preview:
        with self.caps.reserve(self.table, info.namespace, info.name, owner, policy or DEFAULT_POLICY):
            return await self._create(zone, info, port, owner)

    async def _create(self, zone: PreviewZone, info: SandboxInfo, port: int, owner: str) -> Preview:
        preview = objects.new_preview(new_token(), info.namespace, info.name, info.uid, port, owner, zone, utcnow())
        name = object_name(preview.token)
        try:
            await self.kube.create(SERVICE, info.namespace, objects.service(preview, dict(info.pod_selector)))
        except KubeError as e:
            raise Refusal(502, "preview_not_created", f"The preview's Service could not be created ({e.status} {e.reason}).") from None
        try:
            route = await self.kube.create(HTTPROUTE, info.namespace, objects.httproute(preview, zone))
        except KubeError as e:
            try:
                await self.kube.delete(SERVICE, info.namespace, name)
            except KubeError as rollback:
                log.error("preview %s: Service left behind after a failed HTTPRoute: %s %s", preview.fingerprint,
                          rollback.status, rollback.reason)
            raise Refusal(502, "preview_not_created", f"The preview's HTTPRoute could not be created ({e.status} {e.reason}).") from None
        preview = replace(preview, uid=(route.get("metadata") or {}).get("uid", ""))
        self.table.put(preview)  # served at once on this replica; others learn it from the watch
        self._record("preview.created", preview)
        return preview

    async def keepalive(self, preview: Preview, zone: PreviewZone) -> Preview:
        expires = min(utcnow() + timedelta(seconds=zone.idle_ttl), preview.max_until)
        try:
            return await self._extend(preview, expires, event="preview.kept_alive")
        except KubeError as e:
            raise Refusal(502, "preview_not_updated", f"The preview could not be extended ({e.status} {e.reason}).") from None

    async def delete(self, preview: Preview, *, event: str = "preview.deleted", reason: str | None = None) -> bool:
        """Delete the HTTPRoute (only this incarnation) and the Service; True when this call
        deleted it, False when someone else already had."""
        try:
            deleted = await self.kube.delete(HTTPROUTE, preview.namespace, object_name(preview.token), uid=preview.uid or None)
            await self.kube.delete(SERVICE, preview.namespace, object_name(preview.token))
        except KubeError as e:
            raise Refusal(502, "preview_not_deleted", f"The preview could not be deleted ({e.status} {e.reason}).") from None
        self.table.forget(preview)
        self._end_running(preview.token, "preview deleted")
        if deleted:
            self._record(event, preview, reason=reason)
        return deleted

    # --- the reaper -------------------------------------------------------------------------------

    async def reap_once(self) -> dict[str, int]:
        """Delete expired previews and those whose sandbox is gone; counts by reason of the
        ones this replica deleted (another reaper may have deleted the rest)."""
        now = utcnow()
        reaped: dict[str, int] = {}
        for preview in self.table.previews():
            reason = self._reap_reason(preview, now)
            if reason is None:
                continue
            try:
                if await self.delete(preview, event="preview.reaped", reason=reason):
                    reaped[reason] = reaped.get(reason, 0) + 1
                    self.on_reaped(reason)
            except Refusal as e:
                log.warning("preview %s: not reaped: %s", preview.fingerprint, e.message)
        return reaped

    def sandbox_of(self, preview: Preview) -> SandboxInfo | None:
        """The sandbox a preview was made for: by name and uid (a same-named successor is not)."""
        info = self.registry.find(preview.namespace, preview.sandbox)
        return info if info is not None and info.uid == preview.sandbox_uid else None

    def _reap_reason(self, preview: Preview, now: datetime) -> str | None:
        if now >= preview.max_until:
            return "max-lifetime"
        if now >= preview.expires_at:
            return "idle"
        if self.registry.synced() and preview.namespace in self.registry.namespaces and self.sandbox_of(preview) is None:
            return "sandbox-gone"
        return None

    async def _reap_forever(self) -> None:
        await every(self.reap_interval, self.reap_once, log, "preview reaper round failed")

    # --- plumbing ---------------------------------------------------------------------------------

    def _record(self, kind: str, preview: Preview, **detail) -> None:
        self.audit.record(AuditRecord(
            kind=kind, principal=preview.owner or None, path=f"{preview.namespace}/{preview.sandbox}",
            detail={"preview": preview.fingerprint, "port": preview.port,
                    **{k: v for k, v in detail.items() if v is not None}},
        ))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # already logged in _extend; retrieved so asyncio does not warn
