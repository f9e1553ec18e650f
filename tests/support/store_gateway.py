"""A real Sandgate on a chosen store, and the `sandgate keys` / `db` command run without blocking.

`running_gateway` (tests.support.harness) always uses the embedded store in tmp_path/"data";
`running_gateway_on` is the same gateway with `database_url` set (PostgreSQL). `sandgate_cli`
runs `python -m gateway ...` as an asyncio subprocess, so an in-process gateway keeps serving
while the command runs.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from gateway.server.app import ServeOptions, start_gateway

REPO = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable


@asynccontextmanager
async def running_gateway_on(tmp_path: Path, routes_yaml: str, policies_yaml: str, *, database_url: str | None,
                             drain_seconds: float = 5.0):
    """Like harness.running_gateway, with the store at `database_url` (None: embedded)."""
    (tmp_path / "routes.yaml").write_text(routes_yaml)
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "policies.yaml").write_text(policies_yaml)
    log = io.StringIO()
    options = ServeOptions(
        routes=str(tmp_path / "routes.yaml"),
        policies=str(policies),
        listen=["127.0.0.1:0"],
        admin="127.0.0.1:0",
        tls_dir=str(tmp_path / "tls"),
        data_dir=str(tmp_path / "data"),
        database_url=database_url,
        reload_interval=0,
        drain_seconds=drain_seconds,
        access_log=log,
    )
    running = await start_gateway(options)
    running.log_buffer = log
    try:
        yield running
    finally:
        if not running.gateway.draining:
            await running.drain()


def cli_environment(**extra: str | None) -> dict[str, str]:
    """This process's environment without any SANDGATE_* setting, plus `extra` (None removes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDGATE_")}
    env["PYTHONPATH"] = str(REPO)
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


async def sandgate_cli(*args: str, timeout: float = 30.0, **env: str | None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m gateway ARGS` with SANDGATE_* from `env` only."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "gateway", *args, env=cli_environment(**env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()
