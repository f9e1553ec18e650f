"""Pooled, kept-alive connections to upstreams: one aiohttp ClientSession per transport.

Every TCP upstream shares one connector (pooled per host:port). A unix-socket upstream gets a
session of its own, since aiohttp binds a unix connector to one path.
"""

from __future__ import annotations

import itertools

import aiohttp
from yarl import URL

from gateway.config.model import Endpoint, Upstream
from gateway.proxy.h1client import H1Client
from gateway.proxy.h1limits import ResponseLimits

# Headers the client library would otherwise invent; a proxy forwards only what it was given.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _session(connector: aiohttp.BaseConnector, limits: ResponseLimits) -> aiohttp.ClientSession:
    """The session of WebSocket upgrades. Its response parser bounds each line and the count of
    header lines of the 101 (aiohttp's defaults are 8190 bytes and 128 lines) to what the HTTP
    client holds an upstream to; the total stays within their product (4 MiB by default)."""
    return aiohttp.ClientSession(
        **limits.parser_limits(),
        connector=connector,
        auto_decompress=False,  # Content-Encoding passes through untouched
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one user's cookies to another
        timeout=aiohttp.ClientTimeout(total=None),
        raise_for_status=False,
    )


MAX_ROUND_ROBINS = 4096  # upstreams with several endpoints whose rotation is remembered


class UpstreamPool:
    """HTTP goes through the lean keep-alive client; WebSocket upgrades through aiohttp's.

    Sandbox and preview targets are many distinct addresses: the HTTP client keeps at most
    `max_pools` (address, port) pools, `max_idle_per_pool` idle connections in each and
    `max_idle` in all (H1Client). aiohttp's WebSocket connector keeps no upgraded connection
    idle, and drops others after `keepalive_seconds`."""

    def __init__(self, *, keepalive_seconds: float = 60.0, limits: ResponseLimits = ResponseLimits(),
                 max_pools: int = 1024, max_idle_per_pool: int = 64, max_idle: int = 1024):
        self._keepalive = keepalive_seconds
        self._limits = limits
        self.http = H1Client(keepalive_seconds=keepalive_seconds, limits=limits, max_pools=max_pools,
                             max_idle_per_pool=max_idle_per_pool, max_idle=max_idle)
        self._tcp: aiohttp.ClientSession | None = None
        self._unix: dict[str, aiohttp.ClientSession] = {}
        self._round_robin: dict[Upstream, itertools.cycle] = {}

    def _tcp_session(self) -> aiohttp.ClientSession:
        if self._tcp is None:
            connector = aiohttp.TCPConnector(
                limit=0,
                limit_per_host=0,
                keepalive_timeout=self._keepalive,
                ttl_dns_cache=10,
                enable_cleanup_closed=True,
            )
            self._tcp = _session(connector, self._limits)
        return self._tcp

    def session_for(self, endpoint: Endpoint) -> aiohttp.ClientSession:
        if endpoint.unix_path is None:
            return self._tcp_session()
        session = self._unix.get(endpoint.unix_path)
        if session is None:
            connector = aiohttp.UnixConnector(path=endpoint.unix_path, limit=0, keepalive_timeout=self._keepalive)
            session = self._unix[endpoint.unix_path] = _session(connector, self._limits)
        return session

    def pick(self, upstream: Upstream) -> Endpoint:
        """Round-robin over an upstream's endpoints."""
        if len(upstream.endpoints) == 1:
            return upstream.endpoints[0]
        cycle = self._round_robin.get(upstream)
        if cycle is None:
            if len(self._round_robin) >= MAX_ROUND_ROBINS:
                self._round_robin.clear()  # forgetting where a rotation was costs nothing but evenness
            cycle = self._round_robin[upstream] = itertools.cycle(upstream.endpoints)
        return next(cycle)

    def pick_for_retry(self, upstream: Upstream, tried: set[Endpoint]) -> Endpoint:
        """An endpoint not tried yet if a few picks find one (Envoy Gateway's previous_hosts)."""
        for _ in range(5):
            endpoint = self.pick(upstream)
            if endpoint not in tried:
                break
        return endpoint

    async def close(self) -> None:
        await self.http.close()
        sessions = [s for s in [self._tcp, *self._unix.values()] if s is not None]
        for session in sessions:
            await session.close()
        self._tcp = None
        self._unix.clear()


def upstream_url(scheme: str, endpoint: Endpoint, path_and_query: str) -> URL:
    """The URL to request; the path is already normalised and percent-encoded, so keep it as is."""
    if endpoint.unix_path is not None:
        return URL(f"{scheme}://localhost{path_and_query}", encoded=True)
    host = endpoint.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return URL(f"{scheme}://{host}:{endpoint.port}{path_and_query}", encoded=True)
