"""The one place that talks to the Kubernetes API (through kubernetes-asyncio).

Everything Sandgate reads or writes in a cluster goes through `KubeClient`: typed helpers for
the few kinds it uses, returning plain dicts (the objects' JSON, as `kubectl get -o json`
shows them), and `KubeError` carrying the API server's status and reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.stream import WsApiClient

_SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@dataclass(frozen=True, slots=True)
class Kind:
    """A resource the gateway reads or writes: its API group, version and plural name."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


SANDBOX = Kind("agents.x-k8s.io", "v1beta1", "sandboxes", "Sandbox")
SANDBOX_CLAIM = Kind("extensions.agents.x-k8s.io", "v1beta1", "sandboxclaims", "SandboxClaim")
HTTPROUTE = Kind("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
SERVICE = Kind("", "v1", "services", "Service")
POD = Kind("", "v1", "pods", "Pod")


class KubeError(Exception):
    """The API server refused (status = its HTTP status) or could not be reached (status 0)."""

    def __init__(self, status: int, reason: str, message: str = ""):
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def gone(self) -> bool:
        return self.status == 410


def _error(e: Exception) -> KubeError:
    if isinstance(e, ApiException):
        reason, message = e.reason or "", ""
        try:
            body = json.loads(e.body) if e.body else {}
            reason, message = body.get("reason") or reason, body.get("message", "")
        except (ValueError, TypeError):
            pass
        return KubeError(e.status or 0, reason, message)
    return KubeError(0, "Unreachable", str(e) or type(e).__name__)


CALL_TIMEOUT = 10.0  # seconds for one API call; a request waiting on the API server waits no longer

_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


class KubeClient:
    """A connection to one cluster's API server: in-cluster service account or a kubeconfig."""

    def __init__(self, configuration: k8s.Configuration, source: str):
        configuration.connection_pool_maxsize = 64  # each watch holds one connection
        self.configuration = configuration
        self.source = source  # for logs: "in-cluster" or the kubeconfig path
        self.api = k8s.ApiClient(configuration)
        self.core = k8s.CoreV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)

    @classmethod
    async def connect(cls, kubeconfig: str | None = None) -> KubeClient:
        """In-cluster configuration when running in a pod, else the kubeconfig (the given path,
        $KUBECONFIG, or ~/.kube/config)."""
        configuration = k8s.Configuration()
        if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ and _SERVICE_ACCOUNT.exists():
            k8s_config.load_incluster_config(client_configuration=configuration)
            return cls(configuration, "in-cluster")
        path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        try:
            await k8s_config.load_kube_config(config_file=path, client_configuration=configuration)
        except (k8s_config.ConfigException, OSError) as e:
            raise KubeError(0, "NoConfiguration", f"cannot load kubeconfig {path}: {e}") from None
        return cls(configuration, path)

    async def close(self) -> None:
        await self.api.close()

    # --- reads -----------------------------------------------------------------------------

    async def list(self, kind: Kind, namespace: str, label_selector: str | None = None) -> dict:
        """The list object (items + metadata.resourceVersion) of one namespace."""
        query = {"labelSelector": label_selector} if label_selector else {}
        return await self._call("GET", self._path(kind, namespace), query)

    async def get(self, kind: Kind, namespace: str, name: str) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return await self._call("GET", self._path(kind, namespace, name))
        except KubeError as e:
            if e.not_found:
                return None
            raise

    def watch_function(self, kind: Kind):
        """(function, leading args) a kubernetes-asyncio Watch streams a namespace from."""
        if kind.group:
            return self.custom.list_namespaced_custom_object, (kind.group, kind.version)
        return getattr(self.core, f"list_namespaced_{kind.kind.lower()}"), ()

    # --- writes ----------------------------------------------------------------------------

    async def create(self, kind: Kind, namespace: str, body: dict) -> dict:
        return await self._call("POST", self._path(kind, namespace), body=body)

    async def merge_patch(self, kind: Kind, namespace: str, name: str, patch: dict) -> dict:
        """RFC 7386 merge patch (annotations, labels): no read-modify-write race."""
        return await self._call("PATCH", self._path(kind, namespace, name), body=patch, content_type="application/merge-patch+json")

    async def delete(self, kind: Kind, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete (background propagation); False when it was already gone. With `uid`, only
        that incarnation of the name is deleted (a precondition), so two reapers racing a
        re-created object cannot delete the new one."""
        body: dict = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._call("DELETE", self._path(kind, namespace, name), body=body)
            return True
        except KubeError as e:
            if e.not_found or (uid and e.conflict):
                return False
            raise

    # --- exec ------------------------------------------------------------------------------

    def exec_session(self, namespace: str, pod: str, command: list[str], *, container: str | None = None, tty: bool = True):
        """An `async with` context manager yielding the exec WebSocket (channel-prefixed binary
        frames, v4.channel.k8s.io) of `command` in the pod."""
        ws_api = WsApiClient(self.configuration)
        core = k8s.CoreV1Api(ws_api)
        kwargs = {"container": container} if container else {}
        manager = core.connect_get_namespaced_pod_exec(
            pod, namespace, command=command, stdin=True, stdout=True, stderr=True, tty=tty,
            _preload_content=False, **kwargs,
        )
        return _ClosingSession(manager, ws_api)

    # --- plumbing --------------------------------------------------------------------------

    @staticmethod
    def _path(kind: Kind, namespace: str, name: str | None = None) -> str:
        prefix = f"/apis/{kind.group}/{kind.version}" if kind.group else "/api/v1"
        path = f"{prefix}/namespaces/{namespace}/{kind.plural}"
        return f"{path}/{name}" if name else path

    async def _call(self, method: str, path: str, query: dict | None = None, *, body: dict | None = None,
                    content_type: str = "application/json") -> dict:
        """Plain JSON in and out: the typed core models would turn objects into classes that
        the rest of the gateway, which works on dicts, would only convert back."""
        try:
            return await self.api.call_api(
                path, method,
                query_params=list((query or {}).items()),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                response_types_map={200: "object", 201: "object", 202: "object"},
                _return_http_data_only=True,
                _request_timeout=CALL_TIMEOUT,
            )
        except (ApiException, *_TRANSPORT_ERRORS) as e:
            raise _error(e) from None


class _ClosingSession:
    """Opens the exec WebSocket and closes its dedicated client with it."""

    def __init__(self, manager, ws_api: WsApiClient):
        self._manager = manager
        self._ws_api = ws_api

    async def __aenter__(self):
        try:
            manager = await self._manager
            self._ws = await manager.__aenter__()
            self._inner = manager
            return self._ws
        except aiohttp.WSServerHandshakeError as e:
            await self._ws_api.close()
            raise KubeError(e.status, "ExecRefused", e.message) from None
        except (ApiException, *_TRANSPORT_ERRORS) as e:
            await self._ws_api.close()
            raise _error(e) from None

    async def __aexit__(self, *exc):
        try:
            await self._inner.__aexit__(*exc)
        finally:
            await self._ws_api.close()
