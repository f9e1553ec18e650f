"""Fetching JWKS documents over HTTP(S): the only network client of the auth code.

`--resolve HOST:PORT=ADDR:PORT` applies here as it does to backends: every address the gateway
dials goes through the same overrides. The override changes only where the connection goes;
the URL's host stays the `Host` header and the TLS server name, as with curl's `--resolve`.
"""

from __future__ import annotations

import socket
from typing import Mapping

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.config.loader import override_for

MAX_JWKS_BYTES = 1024 * 1024


class OverrideResolver(AbstractResolver):
    """`host:port` → (address, port) from --resolve; anything else through the system resolver."""

    def __init__(self, overrides: Mapping[str, tuple[str, int]]):
        self._overrides = {name.lower(): target for name, target in overrides.items()}
        self._system = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        target = override_for(self._overrides, host, port)
        if target is None:
            return await self._system.resolve(host, port, family)
        address, target_port = target
        return [{
            "hostname": host, "host": address, "port": target_port,
            "family": socket.AF_INET6 if ":" in address else socket.AF_INET, "proto": 0,
            "flags": socket.AI_NUMERICHOST,
        }]

    async def close(self) -> None:
        await self._system.close()


class JwksFetcher:
    def __init__(self, timeout_seconds: float = 5.0, *, overrides: Mapping[str, tuple[str, int]] | None = None):
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._overrides = dict(overrides or {})
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, uri: str) -> bytes:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=OverrideResolver(self._overrides)) if self._overrides else None
            self._session = aiohttp.ClientSession(timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar(),
                                                  connector=connector)
        async with self._session.get(uri, allow_redirects=False, headers={"Accept": "application/json"}) as response:
            if response.status != 200:
                raise ValueError(f"JWKS endpoint answered {response.status}")
            body = await response.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("JWKS document is larger than 1 MiB")
            return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
