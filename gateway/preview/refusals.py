"""A policy denial of the preview API: 403 `policy_violation` with its kebab-case reason in
`violations` (SPEC §3.3), like a SecurityPolicy's denials."""

from __future__ import annotations

from aiohttp import web

from gateway.sandbox.router import Refusal, refusal_response
from gateway.server.errors import error_response


class Denied(Refusal):
    def __init__(self, reason: str, message: str):
        super().__init__(403, "policy_violation", message)
        self.reason = reason


def response_for(refusal: Refusal, request: web.BaseRequest, request_id: str) -> web.Response:
    if isinstance(refusal, Denied):
        return error_response(
            refusal.status, refusal.code, refusal.message, request_id, accept=request.headers.get("Accept", ""),
            violations=[{"code": refusal.reason, "message": refusal.message}],
        )
    return refusal_response(refusal, request, request_id)
