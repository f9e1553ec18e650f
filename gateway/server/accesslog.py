"""One JSON line per request, written in batches off the hot path.

Lines are buffered and flushed every `flush_interval` seconds or when the buffer is large, so a
request costs one json.dumps and one list append, not a system call.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from json.encoder import c_make_encoder, encode_basestring_ascii
from typing import TextIO

# One encoder for every line: json.dumps with separators builds a new encoder per call, which is
# measurable at thousands of lines a second. Same output as json.dumps(separators=(",", ":")).
if c_make_encoder is not None:
    _ENCODE = c_make_encoder(None, json.JSONEncoder().default, encode_basestring_ascii, None, ":", ",", False, False, True)

    def _line(record: dict) -> str:
        return "".join(_ENCODE(record, 0))
else:  # pragma: no cover - CPython always has the C encoder
    _line = json.JSONEncoder(separators=(",", ":")).encode


class AccessLog:
    def __init__(self, stream: TextIO | None = None, *, flush_interval: float = 0.5, max_buffer: int = 256):
        self._stream = stream if stream is not None else sys.stdout
        self._buffer: list[str] = []
        self._interval = flush_interval
        self._max = max_buffer
        self._task: asyncio.Task | None = None

    def write(self, record: dict, encoded: str = "") -> None:
        """One line: `record`, then `encoded` (JSON members already encoded, each after a comma:
        what many lines repeat is encoded once by their callers), then the time."""
        self._buffer.append(f'{_line(record)[:-1]}{encoded},"ts":{round(time.time(), 3)!r}}}')
        if len(self._buffer) >= self._max:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        lines = "\n".join(self._buffer) + "\n"
        self._buffer.clear()
        try:
            self._stream.write(lines)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full log pipe must never take the gateway down

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.flush()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._flusher())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.flush()
