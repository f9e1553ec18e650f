"""The one refusal type: a request that ends here, with the status SPEC §3.3 gives it.

Proxy failures (502/503/504, 413), sandbox and preview refusals (400/404/409/429/503) and
policy denials of the gateway's own APIs (403 `policy_violation`) are all a `Refusal`: `code`
is the error body's `error` (snake_case, as §3.3 names them), `reason` the kebab-case reason
code that audit records, decision metrics and `violations` carry. `server.errors` turns one
into its response; nothing else builds a refusal's body.
"""

from __future__ import annotations


class Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, *,
                 reason: str | None = None, audited: bool | None = None, violations: list[dict] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers
        self.reason = reason or code.replace("_", "-")
        # Refusals that say something about the caller or the cluster are audited: by default a
        # 401 or 404 (who may see what); callers mark others (an address never dialled, ...).
        self.audited = status in (401, 404) if audited is None else audited
        self.violations = violations  # a policy decision's reasons, {"code", "message"} each


def denied(reason: str, message: str) -> Refusal:
    """A policy denial (403 `policy_violation`), like a SecurityPolicy's."""
    return Refusal(403, "policy_violation", message, reason=reason, audited=True,
                   violations=[{"code": reason, "message": message}])
