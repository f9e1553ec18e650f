"""Start a real Sandgate in-process on loopback, on routes given as YAML text."""

from __future__ import annotations

import io
import json
import socket
from contextlib import asynccontextmanager
from pathlib import Path

from gateway.audit import AuditSettings
from gateway.config.loader import LoadOptions
from gateway.server.app import ServeOptions, start_gateway
from gateway.sandbox.terminal import TerminalSettings
from gateway.server.handler import Settings


@asynccontextmanager
async def running_gateway(
    tmp_path: Path,
    routes_yaml: str,
    *,
    overrides: dict[str, tuple[str, int]] | None = None,
    settings: Settings | None = None,
    listen: list[str] | None = None,
    tls_dir: str | None = None,
    reload_interval: float = 0,
    drain_seconds: float = 5.0,
    policies_yaml: str | None = None,
    database_url: str | None = None,
    database_password_file: str | None = None,
    kubeconfig: str | Path | None = None,
    terminal: TerminalSettings | None = None,
    preview_timing: dict | None = None,
    audit: AuditSettings | None = None,
):
    """The gateway on `routes_yaml`, its store at `database_url` (PostgreSQL) or embedded in tmp_path/"data"."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml)
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    if policies_yaml is not None:
        (policies / "policies.yaml").write_text(policies_yaml)
    log = io.StringIO()
    options = ServeOptions(
        routes=str(routes),
        policies=str(policies),
        listen=listen if listen is not None else ["127.0.0.1:0"],
        admin="127.0.0.1:0",
        tls_dir=tls_dir or str(tmp_path / "tls"),
        data_dir=str(tmp_path / "data"),
        database_url=database_url,
        database_password_file=database_password_file,
        reload_interval=reload_interval,
        drain_seconds=drain_seconds,
        load=LoadOptions(overrides=overrides or {}),
        settings=settings or Settings(),
        access_log=log,
        kubeconfig=str(kubeconfig) if kubeconfig is not None else None,
        terminal=terminal or TerminalSettings(),
        preview_timing=preview_timing,
        audit=audit or AuditSettings(),
    )
    running = await start_gateway(options)
    running.log_buffer = log
    try:
        yield running
    finally:
        if not running.gateway.draining:
            await running.drain()


def free_port() -> int:
    """A loopback port nothing listens on (yet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url(running, path: str = "/", listener: str | None = None, scheme: str = "http") -> str:
    host, port = running.addresses[listener] if listener else next(iter(running.addresses.values()))
    return f"{scheme}://{host}:{port}{path}"


def admin_url(running, path: str) -> str:
    host, port = running.admin_address
    return f"http://{host}:{port}{path}"


def access_records(running) -> list[dict]:
    running.gateway.access_log.flush()
    return [json.loads(line) for line in running.log_buffer.getvalue().splitlines() if line]


def gateway_with(*listeners: str) -> str:
    """The Gateway `infra/gw` with these listeners, each a YAML flow mapping."""
    return """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: infra}
spec:
  gatewayClassName: sandgate
  listeners:
""" + "".join(f"  - {listener}\n" for listener in listeners)


GATEWAY = gateway_with("{name: http, port: 80, protocol: HTTP}")


def backend(name: str, port: int, namespace: str = "infra") -> str:
    return f"""\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  endpoints:
  - ip: {{address: 127.0.0.1, port: {port}}}
"""


def route_to(backend_name: str, route_name: str | None = None, *, rule_name: str | None = None,
             namespace: str = "infra") -> str:
    """An HTTPRoute on `gw` sending every request to one Backend; the route is named after it unless told."""
    rule = f"- name: {rule_name}\n    backendRefs" if rule_name else "- backendRefs"
    return f"""\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {route_name or backend_name}, namespace: {namespace}}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  {rule}: [{{group: gateway.envoyproxy.io, kind: Backend, name: {backend_name}}}]
"""


def echo_routes(port: int) -> str:
    """Gateway `gw`, Backend `echo` on loopback `port`, and HTTPRoute `echo` sending every request to it."""
    return GATEWAY + backend("echo", port) + route_to("echo")


def mcp_routes(port: int, backend_name: str = "mcp") -> str:
    """Gateway `gw`, Backend `backend_name` on loopback `port`, and HTTPRoute `mcp` (annotated as an
    MCP route) sending PathPrefix /mcp to it."""
    return GATEWAY + backend(backend_name, port) + f"""\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mcp
  namespace: infra
  annotations: {{sandgate.dev/mcp: "true"}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /mcp}}}}]
    backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: {backend_name}}}]
"""
