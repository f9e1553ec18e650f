"""A preview approval as the store keeps it (SPEC §5): requested, then approved, denied or
expired, once. The store is shared by every replica; a decision made on one wakes waiters on
all of them (PostgreSQL NOTIFY)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

PENDING, APPROVED, DENIED, EXPIRED, FAILED = "pending", "approved", "denied", "expired", "failed"
CHANNEL = "sandgate_approvals"  # the PostgreSQL LISTEN/NOTIFY channel; the payload is the id
LIST_LIMIT = 1000  # rows one listing reads at most
PRUNE_BATCH = 500  # rows one prune statement deletes at most
# create_approval's answers when a cap is reached
OVER_SANDBOX_CAP, OVER_REQUESTER_CAP = "sandbox", "requester"


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    id: str
    zone: str  # "namespace/name" of the PreviewZone
    namespace: str
    sandbox: str
    port: int
    requested_by: str
    status: str
    created_at: datetime
    expires_at: datetime
    decided_by: str | None = None
    decided_at: datetime | None = None
    preview_token: str | None = None  # the capability, handed to the requester once approved
    error: str | None = None


APPROVAL_COLUMNS = ("id", "zone", "namespace", "sandbox", "port", "requested_by", "status", "created_at",
                    "expires_at", "decided_by", "decided_at", "preview_token", "error")
