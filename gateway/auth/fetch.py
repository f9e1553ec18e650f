"""Fetching JWKS documents over HTTP(S): the only network client of the auth code."""

from __future__ import annotations

import aiohttp

MAX_JWKS_BYTES = 1024 * 1024


class JwksFetcher:
    def __init__(self, timeout_seconds: float = 5.0):
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, uri: str) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar())
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
