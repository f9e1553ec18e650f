"""KubeApi: the test-facing handle on the double — start/stop it, arrange state, inject faults."""

from __future__ import annotations

import secrets
import socket
import tempfile
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from kubernetes_asyncio import config
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.stream import WsApiClient

from .catalog import Catalog, ResourceType, load_catalog
from .exec import PodShell, Shells
from .faults import Faults
from .kubeconfig import write_kubeconfig
from .registry import Registry
from .server import ServerState, make_app
from .status import ApiError, not_found
from .store import Store

_HOST = "127.0.0.1"


class KubeApi:
    """A Kubernetes API server on loopback that the real kubernetes-asyncio client talks to.

    The direct methods (create, get, ...) are for arranging and inspecting a test: they take
    the same validation path as the HTTP verbs and raise ApiError where a request would fail.
    """

    def __init__(self, workdir: Path, *, bookmark_interval: float = 1.0, catalog: Catalog | None = None):
        self.token = secrets.token_urlsafe(24)
        self.requests: list[tuple[str, str]] = []  # (method, path with query) of every request
        workdir.mkdir(parents=True, exist_ok=True)
        self._catalog = catalog or load_catalog()
        self._store = Store()
        self._registry = Registry(self._catalog, self._store)
        self._state = ServerState(
            catalog=self._catalog,
            registry=self._registry,
            token=self.token,
            requests=self.requests,
            faults=Faults(),
            shells=Shells(workdir / "pods"),
            sockets=weakref.WeakSet(),
            bookmark_interval=bookmark_interval,
        )
        self._port = 0
        self._runner: web.AppRunner | None = None
        self.kubeconfig = workdir / "kubeconfig"

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self._port}"

    # ----- lifecycle

    async def start(self) -> None:
        """Listen (again): on a free port the first time, on the same port after a stop()."""
        if self._runner is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the old connections linger in TIME_WAIT
        try:
            sock.bind((_HOST, self._port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._state.address = f"{_HOST}:{self._port}"
        # handler_cancellation: a watch whose client went away stops at once, not at its next write.
        runner = web.AppRunner(make_app(self._state), handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        write_kubeconfig(self.kubeconfig, self.url, self.token)

    async def stop(self) -> None:
        """The API goes away: open watches end, exec sockets close, the port is released."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()  # closes the listener, then the app's on_shutdown ends the streams

    # ----- clients

    async def client(self) -> ApiClient:
        """A kubernetes-asyncio ApiClient loaded from the kubeconfig; the caller closes it."""
        return ApiClient(await self._configuration())

    async def ws_client(self) -> WsApiClient:
        """The same, for exec over WebSocket (CoreV1Api.connect_get_namespaced_pod_exec)."""
        return WsApiClient(await self._configuration())

    async def _configuration(self) -> Configuration:
        configuration = Configuration()
        await config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
        return configuration

    # ----- arranging and inspecting state

    def create(self, obj: dict) -> dict:
        rtype, version = self._type(obj.get("apiVersion", ""), obj.get("kind", ""))
        namespace = obj.get("metadata", {}).get("namespace", "default") if rtype.namespaced else None
        return self._registry.create(rtype, version, namespace, obj).obj

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        rtype, version = self._type(api_version, kind)
        try:
            return self._registry.get(rtype, version, namespace, name)
        except ApiError as error:
            if error.code == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None = None) -> list[dict]:
        rtype, version = self._type(api_version, kind)
        return self._registry.list(rtype, version, namespace)

    def set_status(self, api_version: str, kind: str, namespace: str | None, name: str, status: dict) -> dict:
        """As a controller writing /status: validated, a MODIFIED event, no generation change."""
        rtype, version = self._type(api_version, kind)
        current = self.get(api_version, kind, namespace, name)
        if current is None:
            raise not_found(rtype, name)
        body = {**current, "status": status}
        subresource = "status" if rtype.has_status(version) else None
        return self._registry.replace(rtype, version, namespace, name, body, subresource=subresource).obj

    def delete(
        self, api_version: str, kind: str, namespace: str | None, name: str, *, propagation: str = "Background"
    ) -> dict:
        rtype, version = self._type(api_version, kind)
        return self._registry.delete(rtype, version, namespace, name, propagation=propagation)[0]

    def compact(self) -> None:
        """Forget the watch history so far: resuming from an older resourceVersion gets 410."""
        self._store.compact()

    @property
    def resource_version(self) -> str:
        """The latest resourceVersion handed out."""
        return str(self._store.revision)

    def fail_next(
        self,
        method: str,
        resource_plural: str,
        status: int = 500,
        times: int = 1,
        reason: str = "InternalError",
        message: str | None = None,
    ) -> None:
        self._state.faults.add(method, resource_plural, status, times, reason, message)

    def register_pod_shell(
        self, namespace: str, pod_name: str, cwd: Path | str | None = None, env: dict[str, str] | None = None
    ) -> PodShell:
        """Where exec into this pod runs its commands; by default a fresh directory per pod."""
        return self._state.shells.register(namespace, pod_name, Path(cwd) if cwd else None, env)

    def _type(self, api_version: str, kind: str) -> tuple[ResourceType, str]:
        return self._catalog.by_kind(api_version, kind)


@asynccontextmanager
async def running_kube_api(tmp_path: Path, *, bookmark_interval: float = 1.0) -> AsyncIterator[KubeApi]:
    """A started KubeApi on 127.0.0.1 (a free port), stopped on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="kube-api-", dir=tmp_path))
    api = KubeApi(workdir, bookmark_interval=bookmark_interval)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()
