"""The echo upstream, remembering every request it received: to prove a refused request never
reached the upstream."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from tests.support.echo import make_echo_app


@dataclass
class Recorded:
    port: int = 0
    requests: list[tuple[str, str, list[tuple[str, str]]]] = field(default_factory=list)  # method, path, headers

    def headers(self, index: int, name: str) -> list[str]:
        return [v for k, v in self.requests[index][2] if k.lower() == name.lower()]


async def start_recording_echo(aiohttp_server, name: str = "echo") -> Recorded:
    """A running echo upstream on loopback (`aiohttp_server` is pytest-aiohttp's fixture)."""
    recorded = Recorded()

    @web.middleware
    async def record(request: web.Request, handler):
        recorded.requests.append((request.method, request.raw_path, list(request.headers.items())))
        return await handler(request)

    app = make_echo_app(name)
    app.middlewares.append(record)
    server = await aiohttp_server(app, host="127.0.0.1")
    recorded.port = server.port
    return recorded
