"""Local stand-ins for the platform's services, so that `sandgate dev` works on a fresh machine.

    stack = await start_devstack("http://127.0.0.1:8080")
    stack.services   # {"api.platform.svc.cluster.local:8000": ("127.0.0.1", 41234), ...}
    stack.sandbox    # ("127.0.0.1", 41240): the demo sandbox's "pod"
    stack.write_kubeconfig(path)  # for the Kubernetes API stand-in: the sandbox, its previews
    await stack.stop()

Needs the `dev` extra (the official `mcp` SDK and uvicorn).
"""

try:
    import mcp  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"the dev stack needs the 'dev' extra: pip install 'sandgate[dev]' ({exc})") from exc

from gateway.devstack.runner import Devstack, start_devstack
from gateway.devstack.urls import API_SERVICE, FRONTEND_SERVICE, MCP_SCOPE, MCP_SERVICE, try_commands, try_urls

__all__ = [
    "API_SERVICE",
    "FRONTEND_SERVICE",
    "MCP_SCOPE",
    "MCP_SERVICE",
    "Devstack",
    "start_devstack",
    "try_commands",
    "try_urls",
]
