"""The agent-sandbox side of a cluster, for driving the real `k8s-agent-sandbox` client through
Sandgate: a stand-in for its controller and a stand-in for a sandbox pod.

- `StandInController` watches SandboxClaims in the Kubernetes API double, as the agent-sandbox
  claim controller does, and binds each new one to a Sandbox the way warm-pool adoption does: a
  Sandbox with its own name (`{warmpool}-{n}`, not the claim's), owned by the claim, Ready, with
  the pod's IP in `status.podIPs`; then the claim's status names it (`status.sandbox.name`,
  `podIPs`) with a Ready condition, in one update, which is what the client waits for.
- `runtime_app` is the pod: the legacy python-runtime HTTP API the client calls in this mode
  (`POST /execute` runs `/bin/sh -c` in the pod's directory, `POST /upload` multipart field
  `file`, `GET /download/{path}`), recording every request it receives.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from kubernetes_asyncio import client, watch

from tests.support.kubeapi import KubeApi
from tests.support.sandboxes import CLAIM_API, SANDBOX_API, pod_selector, ready_status, sandbox_object

RECEIVED = web.AppKey("received", list)
_CLAIMS = {"group": "extensions.agents.x-k8s.io", "version": "v1beta1", "plural": "sandboxclaims"}


class StandInController:
    """`async with StandInController(api, "agents", "127.0.0.1"):` binds claims while inside.

    `settle(namespace, name)`, when given, is awaited between the Sandbox turning Ready and the
    claim saying so: a test uses it to wait until the gateway has seen the Sandbox, where a real
    cluster would have the same race between two watchers.
    """

    def __init__(self, api: KubeApi, namespace: str, pod_ip: str,
                 settle: Callable[[str, str], Awaitable[None]] | None = None):
        self.api = api
        self.namespace = namespace
        self.pod_ip = pod_ip
        self.settle = settle
        self.bound: dict[str, str] = {}  # claim name -> sandbox name
        self._numbers = itertools.count(1)
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> StandInController:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        api_client = await self.api.client()
        try:
            claims = client.CustomObjectsApi(api_client)
            while True:  # a watch ends at its timeout; the next one starts over from the current state
                async with watch.Watch() as w:
                    async for event in w.stream(claims.list_namespaced_custom_object, namespace=self.namespace,
                                                timeout_seconds=30, **_CLAIMS):
                        claim = event["raw_object"]
                        if event["type"] == "ADDED":
                            await self._bind(claim)
                        elif event["type"] == "DELETED":
                            self._release(claim)
        finally:
            await api_client.close()

    async def _bind(self, claim: dict) -> None:
        claim_name = claim["metadata"]["name"]
        if (claim.get("status") or {}).get("sandbox") or claim_name in self.bound:
            return
        name = f"{claim['spec']['warmPoolRef']['name']}-{next(self._numbers)}"
        self.bound[claim_name] = name
        self.api.create(sandbox_object(self.namespace, name, owner_claim=claim))
        status = ready_status(self.pod_ip, selector=pod_selector(name))
        self.api.set_status(SANDBOX_API, "Sandbox", self.namespace, name, status)
        if self.settle is not None:
            await self.settle(self.namespace, name)
        self.api.set_status(CLAIM_API, "SandboxClaim", self.namespace, claim_name, {
            "sandbox": {"name": name, "podIPs": [self.pod_ip]}, "conditions": status["conditions"],
        })

    def _release(self, claim: dict) -> None:
        name = self.bound.pop(claim["metadata"]["name"], None)
        if name is not None and self.api.get(SANDBOX_API, "Sandbox", self.namespace, name) is not None:
            self.api.delete(SANDBOX_API, "Sandbox", self.namespace, name)


def runtime_app(root: Path) -> web.Application:
    """The sandbox pod's runtime API, working in `root`; `app[RECEIVED]` lists (method, path,
    headers) of every request."""
    received: list[tuple[str, str, dict]] = []

    def inside(relative: str) -> Path:
        path = (root / relative).resolve()
        if root.resolve() not in path.parents:
            raise web.HTTPBadRequest(text="path escapes the sandbox root")
        return path

    @web.middleware
    async def record(request: web.Request, handler):
        received.append((request.method, request.raw_path, dict(request.headers)))
        return await handler(request)

    async def execute(request: web.Request) -> web.Response:
        payload = await request.json()
        process = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", payload["command"], cwd=root,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), payload.get("timeout_seconds") or 30)
        except asyncio.TimeoutError:
            process.kill()
            stdout, stderr = await process.communicate()
            return web.json_response({"stdout": stdout.decode(), "stderr": stderr.decode(), "exit_code": 124,
                                      "timed_out": True})
        return web.json_response({"stdout": stdout.decode(), "stderr": stderr.decode(), "exit_code": process.returncode})

    async def upload(request: web.Request) -> web.Response:
        form = await request.post()
        field = form["file"]
        inside(field.filename).parent.mkdir(parents=True, exist_ok=True)
        inside(field.filename).write_bytes(field.file.read())
        return web.json_response({"message": f"File '{field.filename}' uploaded successfully."})

    async def download(request: web.Request) -> web.StreamResponse:
        path = inside(request.match_info["path"])
        if not path.is_file():
            return web.json_response({"detail": "File not found"}, status=404)
        return web.Response(body=path.read_bytes(), content_type="application/octet-stream")

    app = web.Application(middlewares=[record])
    app[RECEIVED] = received
    app.router.add_post("/execute", execute)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download/{path:.+}", download)
    return app
