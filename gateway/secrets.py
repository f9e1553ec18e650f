"""Secrets from files (SPEC §6): the router token, the API-key pepper, the database password.

Each is a file's content (a mounted Secret, or a file the Key Vault CSI driver writes), re-read
when the file changes so that a rotated Secret takes effect without a restart. A change is seen
within RECHECK_SECONDS: callers ask for the value per request, and at most one stat() a second
looks at the file. Kubernetes swaps a Secret's files through a symlink, so the file's identity
(inode, mtime, size) tells a new version. While running, a file that disappears or is emptied
keeps the last good value (a Secret being swapped, like a failed JWKS fetch keeping its keys);
at startup a missing or unusable secret stops the gateway with one line naming it.
"""

from __future__ import annotations

import os
from time import monotonic

RECHECK_SECONDS = 1.0


class MissingSecret(Exception):
    """A required secret is missing or unusable; the message names it and its file."""


class SecretFile:
    def __init__(self, path: str, what: str, *, min_bytes: int = 1):
        self.path = path
        self.what = what  # e.g. "API key pepper", as messages name it
        self._min_bytes = min_bytes
        self._value = b""
        self._stamp: tuple | None = None
        self._checked = monotonic()
        self._load()

    def value(self) -> bytes:
        """The current content, surrounding whitespace stripped."""
        now = monotonic()
        if now - self._checked > RECHECK_SECONDS:
            self._checked = now
            try:
                self._load()
            except MissingSecret:
                pass  # keep the last good value until a usable file is back
        return self._value

    def text(self) -> str:
        return self.value().decode()

    def _load(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, "rb") as f:
                value = f.read().strip()
        except OSError:
            raise MissingSecret(f"missing secret: {self.what} file {self.path}") from None
        if not value:
            raise MissingSecret(f"empty secret: {self.what} file {self.path}")
        if len(value) < self._min_bytes:
            raise MissingSecret(f"secret too short: {self.what} file {self.path} needs at least {self._min_bytes} bytes")
        self._value, self._stamp = value, stamp
