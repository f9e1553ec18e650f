"""Background rounds that must outlive one failure (a reaper, a pruner)."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable


async def every(interval: float, round_: Callable[[], Awaitable[object]], log: logging.Logger, failed: str) -> None:
    """Run `round_` every `interval` seconds until cancelled; a failing round is logged with
    `failed` and the next one runs as usual."""
    while True:
        await asyncio.sleep(interval)
        try:
            await round_()
        except Exception:  # noqa: BLE001 - one bad round (a database or API outage) must not end them all
            log.warning(failed, exc_info=True)
