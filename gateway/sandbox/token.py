"""The static router token of a SandboxRouter (compatibility with agent-sandbox clients).

The token is a file's content (a mounted Secret), re-read when the file changes so a rotated
Secret takes effect without a restart; compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from time import monotonic

RECHECK_SECONDS = 1.0  # a rotation is seen within a second; no stat() per request


class MissingToken(Exception):
    pass


class RouterToken:
    def __init__(self, path: str):
        self.path = path
        self._token = b""
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                with open(self.path, "rb") as f:
                    token = f.read().strip()
                if not token:
                    raise MissingToken(f"router token file {self.path} is empty")
                self._token, self._stamp = token, stamp
        except OSError:
            if self._stamp is None:
                raise MissingToken(f"router token file {self.path} is missing") from None
            # a Secret being swapped: keep the last token until the new file is there

    def matches(self, authorization: str | None) -> bool:
        now = monotonic()
        if now - self._checked > RECHECK_SECONDS:
            self._checked = now
            try:
                self._load()
            except MissingToken:
                pass  # an emptied file keeps the last good token, like a failed JWKS fetch
        if not authorization or not authorization[:7].lower() == "bearer ":
            return False
        return hmac.compare_digest(authorization[7:].strip().encode(), self._token)
