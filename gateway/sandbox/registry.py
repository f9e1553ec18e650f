"""What the gateway knows about sandboxes: a live copy of Sandboxes and SandboxClaims per
namespace, kept by watches, so resolving a sandbox is a dictionary lookup (§4.1 `Cluster`).

A sandbox's owner and sharing come from its SandboxClaim and, for sandboxes created directly,
from the Sandbox itself. The claim is the one the Sandbox's ownerReference names by uid, never a
claim that merely has the same name: a claim deleted and re-created by someone else (same name,
new uid) must not become the owner of the old claim's sandbox, nor the other way round.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from gateway.kube import POD, SANDBOX, SANDBOX_CLAIM, KubeClient, WatchedKind

log = logging.getLogger("sandgate.sandbox")

POD_NAME_ANNOTATION = "agents.x-k8s.io/pod-name"  # set by agent-sandbox on warm-pool adoption


@dataclass(frozen=True, slots=True, eq=False)  # identity: one object per observed state
class SandboxInfo:
    namespace: str
    name: str
    uid: str
    ready: bool
    not_ready_reason: str
    pod_ips: tuple[str, ...]
    service_fqdn: str | None
    pod_name: str
    pod_selector: tuple[tuple[str, str], ...]  # status.selector: the labels of exactly its pod
    metadata: tuple[dict, ...]  # claim metadata first, then the Sandbox's: where owners are read


def sandbox_info(sandbox: dict, claim: dict | None) -> SandboxInfo:
    meta = sandbox.get("metadata") or {}
    status = sandbox.get("status") or {}
    ready, reason = _ready(status)
    return SandboxInfo(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        ready=ready,
        not_ready_reason=reason,
        pod_ips=tuple(ip for ip in status.get("podIPs") or () if isinstance(ip, str)),
        service_fqdn=status.get("serviceFQDN") or None,
        pod_name=(meta.get("annotations") or {}).get(POD_NAME_ANNOTATION) or meta.get("name", ""),
        pod_selector=_equality_selector(status.get("selector") or ""),
        metadata=tuple(m for m in ((claim or {}).get("metadata"), meta) if m),
    )


def _equality_selector(text: str) -> tuple[tuple[str, str], ...]:
    """`a=b,c=d` as pairs; a selector with set-based terms cannot become a Service selector."""
    pairs = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, op, value = term.partition("=")
        if not op or key.endswith("!") or " in " in term or " notin " in term:
            return ()
        pairs.append((key.strip(), value.removeprefix("=").strip()))  # "a=b" or "a==b"
    return tuple(pairs)


def _ready(status: dict) -> tuple[bool, str]:
    for condition in status.get("conditions") or ():
        if condition.get("type") == "Ready":
            if condition.get("status") == "True":
                return True, ""
            return False, condition.get("message") or condition.get("reason") or "not ready"
    return False, "the sandbox has not reported readiness yet"


class SandboxRegistry:
    """Watches of Sandboxes and SandboxClaims in the namespaces SandboxRouters open."""

    def __init__(self, kube: KubeClient, on_deleted: Callable[[str, str], None] | None = None,
                 on_changed: Callable[[str, str | None], None] | None = None):
        self.kube = kube
        self._on_deleted = on_deleted
        # (namespace, name or None for all of it): who may reach a sandbox may have changed
        self._on_changed = on_changed
        self._sandboxes: dict[str, WatchedKind] = {}
        self._claims: dict[str, WatchedKind] = {}
        # namespace -> name -> SandboxInfo: built once per change, not once per request
        self._info: dict[str, dict[str, SandboxInfo]] = {}

    def watch_namespaces(self, namespaces: set[str]) -> None:
        """Start watches for new namespaces; stop those no SandboxRouter opens any more."""
        for namespace in namespaces - self._sandboxes.keys():
            self._info[namespace] = {}
            self._sandboxes[namespace] = WatchedKind(self.kube, SANDBOX, namespace, self._sandbox_changed)
            self._claims[namespace] = WatchedKind(self.kube, SANDBOX_CLAIM, namespace, self._claim_changed)
            self._sandboxes[namespace].start()
            self._claims[namespace].start()
        for namespace in self._sandboxes.keys() - namespaces:
            self._info.pop(namespace, None)
            for table in (self._sandboxes, self._claims):
                asyncio.get_running_loop().create_task(table.pop(namespace).stop())

    @property
    def namespaces(self) -> set[str]:
        return set(self._sandboxes)

    def synced(self) -> bool:
        return all(w.synced.is_set() for w in (*self._sandboxes.values(), *self._claims.values()))

    def connected(self) -> bool:
        return all(w.connected for w in (*self._sandboxes.values(), *self._claims.values()))

    async def wait_synced(self, timeout: float) -> bool:
        waits = [w.synced.wait() for w in (*self._sandboxes.values(), *self._claims.values())]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def find(self, namespace: str, name: str) -> SandboxInfo | None:
        cached = self._info.get(namespace)
        if cached is None:
            return None
        info = cached.get(name)
        if info is None:
            sandbox = self._sandboxes[namespace].objects.get(name)
            if sandbox is None:
                return None
            info = cached[name] = sandbox_info(sandbox, self._claim_of(namespace, sandbox))
        return info

    def _claim_of(self, namespace: str, sandbox: dict) -> dict | None:
        """The SandboxClaim that owns the sandbox: the ownerReference's name AND uid must match
        (a name alone outlives the object it named)."""
        claims = self._claims[namespace].objects
        for ref in sandbox["metadata"].get("ownerReferences") or ():
            if not isinstance(ref, dict) or ref.get("kind") != "SandboxClaim":
                continue
            claim = claims.get(ref.get("name"))
            uid = ref.get("uid")
            if claim is not None and uid and (claim.get("metadata") or {}).get("uid") == uid:
                return claim
        return None

    def _sandbox_changed(self, event: str, sandbox: dict) -> None:
        meta = sandbox["metadata"]
        namespace = meta.get("namespace", "")
        self._info.get(namespace, {}).pop(meta["name"], None)
        if event == "DELETED" and self._on_deleted is not None:
            self._on_deleted(namespace, meta["name"])
        elif self._on_changed is not None:
            self._on_changed(namespace, meta["name"])

    def _claim_changed(self, event: str, claim: dict) -> None:
        # A claim is found from its sandbox's side: forget the namespace's derived infos.
        namespace = claim["metadata"].get("namespace", "")
        self._info.get(namespace, {}).clear()
        if self._on_changed is not None:
            self._on_changed(namespace, None)

    async def pod_of(self, info: SandboxInfo) -> str | None:
        """The name of the sandbox's pod when that pod really is the sandbox's, else None.

        The name comes from an annotation (agent-sandbox's warm-pool adoption) that anyone who
        may edit the Sandbox can point at another pod: before a shell is opened in it, the pod
        must name the Sandbox's uid as an owner, or carry every label of the Sandbox's
        `status.selector` (which agent-sandbox derives from the sandbox's name). KubeError when
        the API cannot tell."""
        pod = await self.kube.get(POD, info.namespace, info.pod_name)
        if pod is None:
            return None
        meta = pod.get("metadata") or {}
        owned = any(isinstance(ref, dict) and ref.get("kind") == "Sandbox" and info.uid and ref.get("uid") == info.uid
                    for ref in meta.get("ownerReferences") or ())
        labels = meta.get("labels") or {}
        selected = bool(info.pod_selector) and all(labels.get(key) == value for key, value in info.pod_selector)
        return info.pod_name if owned or selected else None

    async def stop(self) -> None:
        watches = [*self._sandboxes.values(), *self._claims.values()]
        self._sandboxes.clear()
        self._claims.clear()
        self._info.clear()
        await asyncio.gather(*(w.stop() for w in watches))
