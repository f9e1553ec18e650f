"""Audit: one record per decision or lifecycle event, batched into the store off the request path."""

from gateway.audit.record import AuditRecord
from gateway.audit.log import AuditLog, AuditSettings

__all__ = ["AuditLog", "AuditRecord", "AuditSettings"]
