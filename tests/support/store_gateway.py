"""The `sandgate keys` / `db` commands run without blocking, next to a gateway on a chosen store.

The gateway is tests.support.harness.running_gateway (`database_url=` picks PostgreSQL over the
embedded store). `sandgate_cli` runs `python -m gateway ...` as an asyncio subprocess, so an
in-process gateway keeps serving while the command runs.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable


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
