"""Fixtures that several test files share. A test file imports the ones it uses by name, which is
how pytest finds them there (tests/conftest.py holds the ones every file gets).

Both upstream fixtures are named `upstream`, so a file imports one of them, never both.
"""

from __future__ import annotations

import pytest

from tests.support.issuer import Issuer
from tests.support.kubeapi import running_kube_api
from tests.support.mcp_upstream import RecordingASGI, make_mcp_app, serve_asgi
from tests.support.recording import Recorded, start_recording_echo
from tests.support.sandboxes import SandboxWorld


@pytest.fixture
async def issuer():
    """A running JWKS issuer on loopback (tests/support/issuer.py)."""
    issuer = await Issuer().start()
    yield issuer
    await issuer.stop()


@pytest.fixture
async def upstream_port(echo_servers) -> int:
    """The port of the echo upstream `echo` (tests/conftest.py's `echo_servers`)."""
    return (await echo_servers("echo"))["echo"][1]


@pytest.fixture(name="upstream")
async def recording_echo(aiohttp_server) -> Recorded:
    """The echo upstream `echo`, remembering every request it received."""
    return await start_recording_echo(aiohttp_server)


@pytest.fixture(name="upstream")
async def recording_mcp():
    """The MCP SDK server on loopback, recording every exchange; its port is `.port`."""
    app = RecordingASGI(make_mcp_app())
    async with serve_asgi(app) as port:
        app.port = port
        yield app


@pytest.fixture
async def world(tmp_path, aiohttp_server):
    """Sandboxes in the Kubernetes API double, each with a real app on its own pod IP."""
    async with running_kube_api(tmp_path) as kube:
        yield SandboxWorld(kube, aiohttp_server)
