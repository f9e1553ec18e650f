"""The static router token of a SandboxRouter (compatibility with agent-sandbox clients).

The token is a secret file's content (gateway.secrets: re-read when the file changes, so a rotated
Secret takes effect without a restart); compared in constant time.
"""

from __future__ import annotations

import hmac

from gateway.secrets import SecretFile


class RouterToken:
    def __init__(self, path: str):
        self.path = path
        self._secret = SecretFile(path, "router token")  # MissingSecret names the file

    def matches(self, authorization: str | None) -> bool:
        token = self._secret.value()
        if not authorization or not authorization[:7].lower() == "bearer ":
            return False
        return hmac.compare_digest(authorization[7:].strip().encode(), token)
