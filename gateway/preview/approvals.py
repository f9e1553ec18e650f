"""The approval gate for previews (SPEC §5, SandboxPolicy `preview.approval: manual`).

A request waits in the store as `pending`; the sandbox's owner or an admin approves or denies it
on any replica; the decision wakes a long-polling waiter on every replica at once (PostgreSQL
LISTEN/NOTIFY; with the embedded store, which one process owns, a local wake-up). A pending
request lapses after the zone's approval window. The requester may deny (withdraw) but not
approve their own request unless the SandboxPolicy allows self-approval.

The store stays bounded whatever a requester sends: pending requests are capped per sandbox and
per requester (checked in the same transaction as the insert), and requests decided or lapsed
more than RETENTION ago are deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import datetime, timedelta, timezone

from aiohttp import web

from gateway.audit import AuditLog, AuditRecord
from gateway.config.durations import parse_duration
from gateway.config.model import PreviewZone
from gateway.policy.model import SandboxPolicy
from gateway.periodic import every
from gateway.preview.objects import created_view
from gateway.preview.tokens import host_for
from gateway.sandbox.access import DEFAULT_POLICY, relation
from gateway.sandbox.registry import SandboxInfo
from gateway.refusal import Refusal, denied
from gateway.preview.objects import rfc3339
from gateway.server.errors import json_response
from gateway.store.approval import APPROVED, DENIED, EXPIRED, FAILED, OVER_SANDBOX_CAP, PENDING, ApprovalRecord

log = logging.getLogger("sandgate.preview")

MAX_WAIT = 60.0  # seconds a long poll may hold a request
RETENTION = 24 * 3600.0  # seconds a decided or lapsed request stays readable
PRUNE_INTERVAL = 300.0
FALLBACK_POLL = 1.0  # without notifications (embedded store shared by workers): re-read this often


class Approvals:
    def __init__(self, store, previews, audit: AuditLog, zones: dict[str, PreviewZone], *,
                 retention: float = RETENTION, prune_interval: float = PRUNE_INTERVAL):
        self.store = store
        self.retention = retention
        self.prune_interval = prune_interval
        self._pruner: asyncio.Task | None = None
        self.previews = previews  # gateway.preview.service.Previews
        self.audit = audit
        self.zones = zones
        self._waiters: dict[str, set[asyncio.Event]] = {}  # approval id -> one event per waiting request
        self._notified = False  # True once the store delivers notifications

    async def start(self) -> None:
        self._notified = await self.store.listen_approvals(self._wake)
        self._pruner = asyncio.get_running_loop().create_task(self._prune_forever())

    async def stop(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            await asyncio.gather(self._pruner, return_exceptions=True)
            self._pruner = None
        await self.store.unlisten_approvals()

    async def prune_once(self) -> int:
        """Delete what was decided or lapsed more than `retention` ago, in batches."""
        before = datetime.now(timezone.utc) - timedelta(seconds=self.retention)
        pruned = 0
        while (deleted := await self.store.prune_approvals(before)) > 0:
            pruned += deleted
        return pruned

    async def _prune_forever(self) -> None:
        await every(self.prune_interval, self.prune_once, log, "approvals: pruning failed; trying again later")

    def _wake(self, approval_id: str) -> None:
        for event in self._waiters.get(approval_id, ()):
            event.set()

    # --- operations ------------------------------------------------------------------------

    async def request(self, zone: PreviewZone, info: SandboxInfo, port: int, requester: str,
                      policy: SandboxPolicy | None) -> ApprovalRecord:
        policy = policy or DEFAULT_POLICY
        # a request that could never be granted is refused now, not after someone approved it
        self.previews.caps.check(self.previews.table, info.namespace, info.name, requester, policy)
        now = datetime.now(timezone.utc)
        record = ApprovalRecord(
            id=uuid.uuid4().hex, zone=zone.key, namespace=info.namespace, sandbox=info.name, port=port,
            requested_by=requester, status=PENDING, created_at=now,
            expires_at=now + timedelta(seconds=zone.approval_window),
        )
        over = await self.store.create_approval(record, max_per_sandbox=policy.preview_max_pending_per_sandbox,
                                                max_per_requester=policy.preview_max_pending_per_requester)
        if over == OVER_SANDBOX_CAP:
            raise Refusal(429, "approval_limit", f"Sandbox {info.name} already has "
                          f"{policy.preview_max_pending_per_sandbox} requests waiting for approval.")
        if over is not None:
            raise Refusal(429, "approval_limit", f"You already have "
                          f"{policy.preview_max_pending_per_requester} requests waiting for approval.")
        self._record("preview.requested", record, requester)
        return record

    async def handle(self, request: web.BaseRequest, parts: list[str], zone: PreviewZone, claims, policy, origin: str):
        if not parts and request.method == "GET":
            status = request.query.get("status")
            records = await self.store.list_approvals(status)
            visible = [await self._view(r, claims, policy, origin) for r in records if self._may_see(r, claims, policy)]
            return json_response(200, {"approvals": visible})
        if len(parts) == 1:
            record = await self._visible(parts[0], claims, policy)
            if request.method == "GET":
                record = await self._wait(record, request.query.get("wait"))
                return json_response(200, await self._view(record, claims, policy, origin))
            if request.method == "POST":
                decided = await self._decide(request, record, claims, policy)
                return json_response(200, await self._view(decided, claims, policy, origin))
        raise Refusal(404, "no_route", "No such approval endpoint.")

    async def _visible(self, approval_id: str, claims, policy) -> ApprovalRecord:
        record = await self.store.get_approval(approval_id) if _is_id(approval_id) else None
        if record is None or not self._may_see(record, claims, policy):
            raise Refusal(404, "approval_not_found", "No such approval.")
        return await self._expire_if_due(record)

    def _may_see(self, record: ApprovalRecord, claims, policy) -> bool:
        if claims.get("sub") == record.requested_by:
            return True
        info = self.previews.registry.find(record.namespace, record.sandbox)
        return info is not None and relation(info, claims, policy or DEFAULT_POLICY) is not None

    async def _wait(self, record: ApprovalRecord, wait: str | None) -> ApprovalRecord:
        if _settled(record) or not wait:
            return record
        try:
            seconds = min(parse_duration(wait), MAX_WAIT)
        except ValueError:
            raise Refusal(400, "bad_request", "wait must be a duration such as 30s.") from None
        loop = asyncio.get_running_loop()
        deadline = min(loop.time() + seconds, loop.time() + (record.expires_at - datetime.now(timezone.utc)).total_seconds())
        event = asyncio.Event()
        waiting = self._waiters.setdefault(record.id, set())
        waiting.add(event)
        try:
            while not _settled(record) and (left := deadline - loop.time()) > 0:
                step = left if self._notified else min(left, FALLBACK_POLL)
                try:
                    await asyncio.wait_for(event.wait(), step)
                except asyncio.TimeoutError:
                    pass
                event.clear()
                record = await self.store.get_approval(record.id) or record
        finally:
            waiting.discard(event)
            if not waiting:
                self._waiters.pop(record.id, None)
        return await self._expire_if_due(record)

    async def _decide(self, request: web.BaseRequest, record: ApprovalRecord, claims, policy) -> ApprovalRecord:
        policy = policy or DEFAULT_POLICY
        info = self.previews.registry.find(record.namespace, record.sandbox)
        try:
            decision = json.loads(await request.content.read(4096)).get("decision")
        except (ValueError, AttributeError, UnicodeDecodeError):
            decision = None
        if decision not in ("approve", "deny"):
            raise Refusal(400, "bad_request", 'The body must be {"decision": "approve"} or {"decision": "deny"}.')
        if record.status != PENDING:  # the caller may see the request: telling its state reveals nothing
            raise Refusal(409, "already_decided", f"This request is already {record.status}.")
        own = claims.get("sub") == record.requested_by
        if own and decision == "deny":
            pass  # withdrawing one's own request needs no one's say
        elif info is None or relation(info, claims, policy) not in ("owner", "admin"):
            raise denied("not-owner-or-admin", "Only the sandbox's owner or an admin decides.")
        elif own and not policy.preview_self_approval:
            raise denied("self-approval-not-allowed", "A request is approved by someone other than its requester.")
        decider = claims["sub"]
        status = APPROVED if decision == "approve" else DENIED
        if not await self.store.decide_approval(record.id, status, decider):
            raise Refusal(409, "already_decided", "This request was decided meanwhile.")
        self._record("preview.approved" if status == APPROVED else "preview.denied", record, decider)
        if status == APPROVED:
            zone = self.zones.get(record.zone)
            try:
                if zone is None:
                    raise Refusal(409, "zone_gone", "The preview zone of this request is no longer served.")
                self.previews.check_request(info, record.port, policy)
                preview = await self.previews.create(zone, info, record.port, record.requested_by, policy)
                await self.store.finish_approval(record.id, preview_token=preview.token)
            except Refusal as e:
                await self.store.finish_approval(record.id, error=e.message)
        self._wake(record.id)
        return await self.store.get_approval(record.id) or record

    async def _expire_if_due(self, record: ApprovalRecord) -> ApprovalRecord:
        if record.status == PENDING and datetime.now(timezone.utc) >= record.expires_at:
            if await self.store.decide_approval(record.id, EXPIRED, None):
                self._record("preview.approval_expired", record, None)
            record = await self.store.get_approval(record.id) or record
        return record

    async def _view(self, record: ApprovalRecord, claims, policy, origin: str) -> dict:
        view = {
            "approval_id": record.id, "status": record.status, "namespace": record.namespace,
            "sandbox": record.sandbox, "port": record.port, "requested_by": record.requested_by,
            "created_at": rfc3339(record.created_at), "expires_at": rfc3339(record.expires_at),
        }
        if record.decided_by:
            view["decided_by"] = record.decided_by
        if record.status == FAILED and record.error:
            view["error"] = record.error
        zone = self.zones.get(record.zone)
        if record.status == APPROVED and record.preview_token and zone is not None:
            # created on whichever replica the decision was made: possibly not in this one's table yet
            preview = await self.previews.table.lookup(host_for(record.preview_token, zone.zone), record.preview_token)
            if preview is not None:
                view["preview"] = created_view(preview, origin)
        return view

    def _record(self, kind: str, record: ApprovalRecord, principal: str | None) -> None:
        self.audit.record(AuditRecord(
            kind=kind, principal=principal, path=f"{record.namespace}/{record.sandbox}",
            detail={"approval": record.id, "port": record.port, "requested_by": record.requested_by},
        ))


def _settled(record: ApprovalRecord) -> bool:
    """Decided, and when approved, with its preview created (or failed): what a waiter waits for."""
    if record.status == PENDING:
        return False
    return record.status != APPROVED or record.preview_token is not None or record.error is not None


def _is_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


