"""What the gateway runs against the Kubernetes API when routes.yaml asks for it: sandbox
access (SandboxRouter, §4) and previews (PreviewZone, §5).

One connection, one set of watches per namespace the SandboxRouters open, shared by both.
Without a Kubernetes connection everything else is still served; these backends answer 503
and readiness says why, as for any other backend that cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.audit import AuditLog, AuditRecord
from gateway.config.model import Config, PreviewZone, SandboxRouter
from gateway.kube import KubeClient, KubeError
from gateway.preview.api import PreviewApi
from gateway.preview.approvals import Approvals
from gateway.preview.router import PreviewRouter
from gateway.preview.service import Previews
from gateway.preview.table import PreviewTable
from gateway.sandbox.registry import SandboxRegistry
from gateway.sandbox.router import SandboxAccess
from gateway.sandbox.terminal import Terminals, TerminalSettings
from gateway.server.logs import event

log = logging.getLogger("sandgate")


class ClusterFeatures:
    def __init__(self, kube: KubeClient | None):
        self.kube = kube
        self.registry: SandboxRegistry | None = None
        self.sandboxes: SandboxAccess | None = None
        self.previews: Previews | None = None
        self.preview_table: PreviewTable | None = None
        self.approvals: Approvals | None = None
        self.zones: dict[str, PreviewZone] = {}

    @classmethod
    async def start(cls, config: Config, gateway, audit: AuditLog, store, *, kubeconfig: str | None,
                    terminal: TerminalSettings, allow_loopback: bool, overrides, preview_timing=None) -> ClusterFeatures | None:
        """None when routes.yaml uses neither a SandboxRouter nor a PreviewZone."""
        if not config.served(SandboxRouter) and not config.served(PreviewZone):
            return None
        try:
            kube = await KubeClient.connect(kubeconfig)
        except KubeError as e:
            event(log, "no Kubernetes connection: sandboxes and previews are unavailable", logging.WARNING, error=e.message)
            kube = None
        features = cls(kube)
        loop = asyncio.get_running_loop()
        if kube is not None:
            features.registry = SandboxRegistry(
                kube, on_deleted=lambda ns, name: loop.create_task(gateway.sandbox_deleted(ns, name)),
                on_changed=lambda ns, name: features.sandboxes.has_streams(ns)
                and loop.create_task(gateway.sandbox_access_changed(ns, name)),
            )

        def record_terminal(kind: str, key: tuple, **detail) -> None:
            (issuer, subject), namespace, name = key
            audit.record(AuditRecord(kind=kind, principal=subject, path=f"{namespace}/{name}", detail={"issuer": issuer, **detail}))

        terminals = Terminals(kube, terminal, record_terminal) if kube is not None else None
        features.sandboxes = gateway.sandboxes = SandboxAccess(
            features.registry, terminals, audit, allow_loopback=allow_loopback, overrides=overrides,
        )
        if kube is not None:
            features.preview_table = PreviewTable(kube, on_change=lambda: gateway.metrics.previews_active.set(len(features.preview_table.by_host)))
            features.previews = Previews(
                kube, features.preview_table, features.registry, features.sandboxes, audit,
                on_reaped=lambda reason: gateway.metrics.previews_reaped.labels(reason).inc(),
                **(preview_timing or {}),
            )
            features.approvals = Approvals(store, features.previews, audit, features.zones)
            await features.approvals.start()
            gateway.previews = PreviewRouter(features.previews, PreviewApi(features.previews, features.approvals))
        features.configure(config)
        if features.registry is not None:
            waits = [features.registry.wait_synced(5.0)]
            if features.preview_table is not None:
                waits.append(features.preview_table.wait_synced(5.0))
            if not all(await asyncio.gather(*waits)):
                event(log, "cluster state not listed yet; readiness waits for it", logging.WARNING)
        if features.previews is not None and config.served(PreviewZone):
            features.previews.start()
        return features

    def configure(self, config: Config) -> None:
        """Routers and zones of a (re)loaded config: namespaces to watch, token files."""
        self.sandboxes.configure(config)
        self.zones.clear()
        self.zones.update(config.served(PreviewZone))
        if self.preview_table is not None:
            self.preview_table.watch_namespaces(self.registry.namespaces if self.zones else set())

    def readiness(self) -> tuple[bool, str]:
        if self.registry is None:
            return False, "unavailable"
        synced = self.registry.synced() and self.registry.connected()
        if self.preview_table is not None:
            synced = synced and self.preview_table.synced()
        return synced, "synced" if synced else "not synced"

    async def stop(self) -> None:
        if self.previews is not None:
            await self.previews.stop()
        if self.approvals is not None:
            await self.approvals.stop()
        if self.preview_table is not None:
            await self.preview_table.stop()
        if self.registry is not None:
            await self.registry.stop()
        if self.kube is not None:
            await self.kube.close()
