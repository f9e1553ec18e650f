"""The kubeconfig file that points a real client at the double (the dev stand-in's format)."""

from __future__ import annotations

from pathlib import Path

from gateway.devstack.cluster import write_kubeconfig as _write


def write_kubeconfig(path: Path, server: str, token: str, namespace: str = "default") -> Path:
    return _write(path, server, token, namespace=namespace, name="sandgate-kube-api-double")
