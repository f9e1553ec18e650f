"""`sandgate dev`: the shipped routes.yaml served against local stand-ins of the platform.

The stand-ins (platform API with OAuth metadata, an MCP server built on the official SDK, a
frontend) listen on free loopback ports; `--resolve`-style overrides send each Service of the
routes file to its stand-in, so the routing under test is exactly what a cluster would run.
"""

from __future__ import annotations

import asyncio
import sys

from gateway.config.loader import LoadOptions
from gateway.server.logs import setup_logging


def run_dev(args) -> int:
    setup_logging("WARNING")
    from gateway.commands.serve import _use_fast_loop

    _use_fast_loop()
    return asyncio.run(_dev(args))


async def _dev(args) -> int:
    from gateway.devstack import start_devstack, try_urls
    from gateway.server.app import ServeOptions, StartupError, serve
    from gateway.server.handler import Settings

    public_url = f"http://{args.listen}"
    stack = await start_devstack(public_url)
    options = ServeOptions(
        routes=args.routes,
        listen=[args.listen],
        admin=args.admin,
        load=LoadOptions(overrides=dict(stack.services)),
        settings=Settings(public_url=public_url),
    )

    def announce(running) -> None:
        print(f"Sandgate is serving {args.routes} on {public_url} (admin: http://{args.admin})", file=sys.stderr)
        for name, (host, port) in sorted(stack.services.items()):
            print(f"  stand-in {name:<45} -> {host}:{port}", file=sys.stderr)
        print("Try:", file=sys.stderr)
        for url in try_urls(public_url):
            print(f"  curl -i {url}", file=sys.stderr)
        print("Ctrl-C stops everything.", file=sys.stderr)

    try:
        await serve(options, announce)
    except StartupError as e:
        print(str(e), file=sys.stderr)
        return 1
    finally:
        await stack.stop()
    return 0
