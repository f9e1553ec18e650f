"""Shared fixtures: real upstream servers on loopback, and a guard that keeps DNS on the machine."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.echo import make_echo_app  # noqa: E402

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
_real_getaddrinfo = socket.getaddrinfo


def _loopback_only_getaddrinfo(host, *args, **kwargs):
    """Resolve nothing that could send a query off the machine: a test that tries fails loudly."""
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and name not in _LOCAL_NAMES:
        try:
            ipaddress.ip_address(name.strip("[]").split("%")[0])
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, f"tests resolve no DNS names ({name})") from None
    return _real_getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback_only_getaddrinfo


@pytest.fixture
async def echo_servers(aiohttp_server):
    """Factory: start named echo upstreams; returns {name: (host, port)}."""
    started = {}

    async def start(*names: str) -> dict[str, tuple[str, int]]:
        for name in names:
            if name not in started:
                server = await aiohttp_server(make_echo_app(name), host="127.0.0.1")
                started[name] = server
        return {n: (s.host, s.port) for n, s in started.items()}

    start.servers = started
    return start
