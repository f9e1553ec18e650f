"""The real agent-sandbox Python client (`k8s-agent-sandbox` from PyPI) through Sandgate, as its
README shows it in direct mode: it creates a SandboxClaim through the Kubernetes API (the
double, from a kubeconfig), waits for the claim to be Ready, then talks to the router URL —
Sandgate — with `X-Sandbox-ID/-Namespace/-Port/-Timeout` (and `X-Sandbox-Pod-IP`) headers and a
router token in `extra_headers`. A stand-in controller binds the claim to a Sandbox on a stand-in
pod on loopback (tests/support/agent_sandbox.py).
"""

from __future__ import annotations

import asyncio

import pytest
from k8s_agent_sandbox import SandboxClient
from k8s_agent_sandbox.models import SandboxDirectConnectionConfig
from kubernetes.config import new_client_from_config  # the sync client the agent-sandbox client uses

from gateway.server.handler import Settings
from tests.support.agent_sandbox import RECEIVED, StandInController, runtime_app
from tests.support.fixtures import world  # noqa: F401 - fixture
from tests.support.harness import running_gateway, url
from tests.support.policy_harness import wait_for, wait_ready
from tests.support.sandboxes import SANDBOX_API, router_yaml

TOKEN = "agent-router-token"
POD_IP = "127.0.0.1"


@pytest.fixture
def client_environment(monkeypatch):
    """Nothing that could send the client's requests anywhere but loopback."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")


def use_the_client(kubeconfig: str, api_url: str, pod_port: int) -> dict:
    """The client's README, direct mode, run as its user would (in a thread: it is synchronous);
    the cluster is named by a kubeconfig file, as `SandboxClient(api_client=...)` documents."""
    sent: list[dict] = []
    config = SandboxDirectConnectionConfig(api_url=api_url, server_port=pod_port,
                                           extra_headers={"Authorization": f"Bearer {TOKEN}"})
    with SandboxClient(connection_config=config, api_client=new_client_from_config(kubeconfig)) as client:
        sandbox = client.create_sandbox(warmpool="python-sandbox-warmpool", namespace="agents",
                                        sandbox_ready_timeout=30)
        # what the client put on the wire, read back from its own HTTP session
        sandbox.connector.session.hooks["response"].append(lambda r, *a, **k: sent.append(dict(r.request.headers)))
        hello = sandbox.commands.run("echo 'Hello from Sandgate!'")
        # a float timeout goes out as Python's str(float)
        computed = sandbox.commands.run("expr 6 \\* 7", timeout=65.123456789)
        sandbox.files.write("notes/hello.txt", b"written through the gateway\n")
        listed = sandbox.commands.run("cat notes/hello.txt")
        read = sandbox.files.read("notes/hello.txt")
        sandbox_id = sandbox.sandbox_id
    return {"hello": hello, "computed": computed, "listed": listed, "read": read, "sent": sent, "id": sandbox_id}


SANDBOX = "python-sandbox-warmpool-1"  # the stand-in controller's first Sandbox for that warm pool


@pytest.mark.parametrize("resolution", ["Cluster", "DNS"])
async def test_the_agent_sandbox_client_runs_commands_and_moves_files_through_sandgate(
        tmp_path, world, aiohttp_server, client_environment, resolution):
    """`Cluster`: Sandgate finds the pod from the watched Sandbox. `DNS`: Sandgate has no
    Kubernetes API at all, as the agent-sandbox router is deployed, and is ready without one."""
    pod_root = tmp_path / "pod"
    pod_root.mkdir()
    pod = await aiohttp_server(runtime_app(pod_root), host=POD_IP)
    token_file = tmp_path / "router-token"
    token_file.write_text(TOKEN + "\n")
    routes = router_yaml(token_file=str(token_file), timeout="120s", resolution=resolution)
    if resolution == "Cluster":
        gateway = running_gateway(tmp_path, routes, settings=Settings(allow_loopback_sandboxes=True),
                                  kubeconfig=world.api.kubeconfig)
    else:  # the cluster's DNS name of the sandbox, as the resolver would answer it (loopback here:
        # resolved addresses pass the same filter as pod IPs)
        gateway = running_gateway(tmp_path, routes, settings=Settings(allow_loopback_sandboxes=True),
                                  kubeconfig=tmp_path / "no-such-kubeconfig",
                                  overrides={f"{SANDBOX}.agents.svc.cluster.local:{pod.port}": (POD_IP, pod.port)})
    async with gateway as gw:
        ready = await wait_ready(gw)

        async def gateway_sees(namespace: str, name: str) -> None:
            if resolution == "Cluster":
                async def known():
                    return gw.cluster.registry.find(namespace, name) is not None
                assert await wait_for(known, timeout=10)

        async with StandInController(world.api, "agents", POD_IP, settle=gateway_sees) as controller:
            result = await asyncio.to_thread(use_the_client, str(world.api.kubeconfig), url(gw, ""), pod.port)
            claims_left = world.api.list("extensions.agents.x-k8s.io/v1beta1", "SandboxClaim", "agents")

            async def released():  # the controller sees the claim's deletion through its watch
                return controller.bound == {}
            await wait_for(released, timeout=10)

    assert ready
    assert result["id"] == SANDBOX and controller.bound == {}
    assert result["hello"].exit_code == 0 and result["hello"].stdout == "Hello from Sandgate!\n"
    assert result["computed"].stdout.strip() == "42"
    assert result["listed"].stdout == result["read"].decode() == "written through the gateway\n"
    assert (pod_root / "notes" / "hello.txt").read_bytes() == b"written through the gateway\n"
    # the client sent the router's headers, its float timeout among them, and Sandgate took them
    timeouts = [h.get("X-Sandbox-Timeout") for h in result["sent"]]
    assert "65.123456789" in timeouts and "60" in timeouts, timeouts
    assert all(h["X-Sandbox-ID"] == SANDBOX and h["X-Sandbox-Namespace"] == "agents"
               and h["X-Sandbox-Port"] == str(pod.port) for h in result["sent"])
    assert {h.get("X-Sandbox-Pod-IP") for h in result["sent"]} == {POD_IP}  # accepted, ignored
    # the pod saw none of them, nor the router token
    received = pod.app[RECEIVED]
    assert [(m, p) for m, p, _ in received] == [
        ("POST", "/execute"), ("POST", "/execute"), ("POST", "/upload"), ("POST", "/execute"),
        ("GET", "/download/notes%2Fhello.txt"),
    ]
    for _, _, headers in received:
        assert not [h for h in headers if h.lower().startswith("x-sandbox-")] and "Authorization" not in headers
    # leaving the client's context deleted its claim; the controller let the Sandbox go with it
    assert claims_left == []
    assert world.api.get(SANDBOX_API, "Sandbox", "agents", SANDBOX) is None
