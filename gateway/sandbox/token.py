"""The static router token of a SandboxRouter (compatibility with agent-sandbox clients).

The token is a secret file's content (gateway.secrets: re-read when the file changes, so a rotated
Secret takes effect without a restart); compared in constant time.
"""

from __future__ import annotations

import hmac

from gateway.secrets import open_secret


class RouterToken:
    def __init__(self, path: str):
        self.path = path
        self._secret = open_secret(path, "router token")  # MissingSecret names it

    def matches(self, authorization: str | None) -> bool:
        token = self._secret.value()
        if not token or not authorization or not authorization[:7].lower() == "bearer ":
            return False
        presented = authorization[7:].strip()
        return presented.isascii() and hmac.compare_digest(presented.encode(), token)
