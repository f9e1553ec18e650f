"""Who may reach a sandbox (SandboxPolicy, SPEC §2.2 and §4.1).

A verified principal (JWT or API key) may reach a sandbox it owns, one shared with it or with
one of its groups, and any sandbox when it is in an admin group. Everyone else is told the
sandbox does not exist (404), so names cannot be probed.
"""

from __future__ import annotations

from gateway.policy.model import SandboxPolicy
from gateway.sandbox.registry import SandboxInfo

DEFAULT_POLICY = SandboxPolicy(namespace="", name="default", revision="builtin", targets=(), order=("", 0))


def owner_of(info: SandboxInfo, policy: SandboxPolicy) -> str | None:
    for meta in info.metadata:
        annotations = meta.get("annotations") or {}
        labels = meta.get("labels") or {}
        owner = (annotations.get(policy.owner_annotation) if policy.owner_annotation else None) or labels.get(policy.owner_label)
        if owner:
            return owner
    return None


def shared_with(info: SandboxInfo, policy: SandboxPolicy) -> tuple[set[str], set[str]]:
    """(users, groups) of the shared-with annotation: a comma-separated list of subjects,
    `group:NAME` for a group (`user:NAME` is accepted for symmetry)."""
    users: set[str] = set()
    groups: set[str] = set()
    for meta in info.metadata:
        value = (meta.get("annotations") or {}).get(policy.shared_with_annotation) or ""
        for entry in value.split(","):
            entry = entry.strip()
            if entry.startswith("group:"):
                groups.add(entry[6:].strip())
            elif entry:
                users.add(entry.removeprefix("user:").strip())
    return users, groups


def groups_of(claims: dict, policy: SandboxPolicy) -> set[str]:
    value = claims.get(policy.groups_claim)
    if isinstance(value, str):
        return {g for g in value.replace(",", " ").split() if g}
    if isinstance(value, list):
        return {g for g in value if isinstance(g, str)}
    return set()


def relation(info: SandboxInfo, claims: dict, policy: SandboxPolicy) -> str | None:
    """"owner", "shared" or "admin" when the principal may reach the sandbox, else None."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        return None
    if owner_of(info, policy) == subject:
        return "owner"
    groups = groups_of(claims, policy)
    users, shared_groups = shared_with(info, policy)
    if subject in users or groups & shared_groups:
        return "shared"
    if groups & set(policy.admin_groups):
        return "admin"
    return None
