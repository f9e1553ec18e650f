"""Kubernetes: the only package that imports kubernetes-asyncio (SPEC §4, §5)."""

from gateway.kube.client import HTTPROUTE, POD, SANDBOX, SANDBOX_CLAIM, SERVICE, Kind, KubeClient, KubeError
from gateway.kube.watch import WatchedKind

__all__ = ["HTTPROUTE", "POD", "SANDBOX", "SANDBOX_CLAIM", "SERVICE", "Kind", "KubeClient", "KubeError", "WatchedKind"]
