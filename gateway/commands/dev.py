"""`sandgate dev`: the shipped routes.yaml served against local stand-ins of the platform.

The stand-ins (platform API with a real OAuth issuer, an MCP server built on the official SDK, a
frontend) listen on free loopback ports; `--resolve`-style overrides send each Service of the
routes file to its stand-in, so the routing under test is exactly what a cluster would run.
The SandboxRouter and the PreviewZone use a Kubernetes API stand-in through a kubeconfig, the
way they use a cluster; it lists one demo sandbox whose pod is an app on 127.0.0.1 (hence
loopback pod IPs are allowed, which `serve` refuses by default) and keeps the Services and
HTTPRoutes of its previews. Policies written to a temporary directory put the MCP route, the
sandbox routes and the preview API behind JWTs from the API stand-in
(gateway/devstack/policy.py), so the policy layer is on show too.

Preview hosts are those of the shipped zone (`{token}-preview.agents-preview.example.net`), served by
this gateway: the tour reaches them with `curl --connect-to`, so no name is looked up.

`dev_environment` is the whole setup; the command and tests/test_dev_oauth.py both use it.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.config.loader import LoadOptions
from gateway.devstack import API_SERVICE, Devstack, start_devstack, try_commands
from gateway.devstack.urls import SANDBOX_NAME, SANDBOX_NAMESPACE
from gateway.devstack.policy import write_policies
from gateway.server.app import ServeOptions, StartupError, serve
from gateway.server.handler import Settings
from gateway.server.logs import setup_logging


@dataclass(frozen=True)
class DevEnvironment:
    public_url: str
    stack: Devstack
    options: ServeOptions  # what to serve: start_gateway(options) or serve(options)


@asynccontextmanager
async def dev_environment(
    routes: str, listen: str, admin: str | None, *, data_dir: str | None = None
) -> AsyncIterator[DevEnvironment]:
    """Start the stand-ins, write the dev policies and kubeconfig, and yield the gateway's
    ServeOptions.

    On exit the stand-ins stop and the temporary directory (policies, kubeconfig) is removed;
    stop the gateway first. `data_dir` (the embedded store) defaults to serve's.
    """
    public_url = f"http://{listen}"
    stack = await start_devstack(public_url)
    try:
        with tempfile.TemporaryDirectory(prefix="sandgate-dev-") as temp:
            policies = Path(temp, "policies")
            policies.mkdir()
            # The gateway fetches keys straight from the stand-in, not through itself: at
            # startup its own listener may not be up yet, and readiness waits for the keys.
            host, port = stack.services[API_SERVICE]
            write_policies(policies, stack.public_url, f"http://{host}:{port}/oauth/jwks")
            extra = {"data_dir": data_dir} if data_dir is not None else {}
            options = ServeOptions(
                routes=routes,
                policies=str(policies),
                listen=[listen],
                admin=admin,
                load=LoadOptions(overrides=dict(stack.services)),
                settings=Settings(public_url=stack.public_url, allow_loopback_sandboxes=True),
                kubeconfig=stack.write_kubeconfig(Path(temp, "kubeconfig")),
                **extra,
            )
            yield DevEnvironment(stack.public_url, stack, options)
    finally:
        await stack.stop()


def run_dev(args) -> int:
    setup_logging("WARNING")
    from gateway.commands.serve import _use_fast_loop

    _use_fast_loop()
    return asyncio.run(_dev(args))


async def _dev(args) -> int:
    async with dev_environment(args.routes, args.listen, args.admin) as dev:

        def announce(running) -> None:
            print(f"Sandgate is serving {args.routes} on {dev.public_url} (admin: http://{args.admin})", file=sys.stderr)
            for name, (host, port) in sorted(dev.stack.services.items()):
                print(f"  stand-in {name:<45} -> {host}:{port}", file=sys.stderr)
            kube_api = dev.stack.kube_api.removeprefix("http://")
            print(f"  stand-in {'Kubernetes API':<45} -> {kube_api} (kubeconfig {dev.options.kubeconfig})",
                  file=sys.stderr)
            host, port = dev.stack.sandbox
            sandbox = f"{SANDBOX_NAMESPACE}/{SANDBOX_NAME}"
            print(f"  sandbox  {sandbox:<45} -> {host}:{port} (no terminal: no pod exec here)", file=sys.stderr)
            print(f"  policies {dev.options.policies} (the MCP, sandbox and preview API routes need a token)",
                  file=sys.stderr)
            print("Try:", file=sys.stderr)
            for command in try_commands(dev.public_url, dev.stack.sandbox[1]):
                print(f"  {command}", file=sys.stderr)
            print("Ctrl-C stops everything.", file=sys.stderr)

        try:
            await serve(dev.options, announce)
        except StartupError as e:
            print(str(e), file=sys.stderr)
            return 1
    return 0
