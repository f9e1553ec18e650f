"""The preview API (SPEC §5): `/gateway/v1/previews` and `/gateway/v1/approvals`, JSON in and out.

Every call needs a verified caller (the SecurityPolicy of the rule serving the API), and acts
only on sandboxes that caller may reach by SandboxPolicy; anything else is 404.
"""

from __future__ import annotations

import json
from typing import Mapping

from aiohttp import web

from gateway.config.model import PreviewZone
from gateway.policy.model import SandboxPolicy
from gateway.preview.approvals import Approvals
from gateway.preview.objects import Preview, created_view
from gateway.preview.service import Previews
from gateway.preview.tokens import is_token
from gateway.sandbox.address import BadSandboxRequest, check_label, check_port
from gateway.refusal import Refusal
from gateway.sandbox.access import DEFAULT_POLICY
from gateway.server.errors import SERVER, json_response

PREVIEWS = "/gateway/v1/previews"
APPROVALS = "/gateway/v1/approvals"
MAX_BODY = 16 * 1024


def is_api_path(path: str) -> bool:
    return path == PREVIEWS or path.startswith(PREVIEWS + "/") or path == APPROVALS or path.startswith(APPROVALS + "/")


class PreviewApi:
    def __init__(self, previews: Previews, approvals: Approvals):
        self.previews = previews
        self.approvals = approvals

    async def handle(self, request: web.BaseRequest, zone: PreviewZone, path: str, claims: Mapping | None,
                     policy: SandboxPolicy | None, origin: str) -> web.StreamResponse:
        if claims is None or not isinstance(claims.get("sub"), str):
            raise Refusal(401, "unauthorized", "Sign in to manage previews.", {"WWW-Authenticate": 'Bearer realm="sandgate"'})
        parts = path.strip("/").split("/")[2:]  # after gateway/v1
        method = request.method
        if parts[0] == "previews":
            if len(parts) == 1 and method == "POST":
                return await self._create(request, zone, claims, policy, origin)
            if len(parts) == 1 and method == "GET":
                return self._list(request, claims, policy, origin)
            if len(parts) in (2, 3):
                preview = self._visible(parts[1], claims, policy)
                if len(parts) == 2 and method == "GET":
                    return json_response(200, preview.as_json(origin))
                if len(parts) == 2 and method == "DELETE":
                    await self.previews.delete(preview)
                    return web.Response(status=204, headers={"Server": SERVER})
                if len(parts) == 3 and parts[2] == "keepalive" and method == "POST":
                    return json_response(200, (await self.previews.keepalive(preview, zone)).as_json(origin))
        elif parts[0] == "approvals":
            return await self.approvals.handle(request, parts[1:], zone, claims, policy, origin)
        raise Refusal(404, "no_route", "No such preview endpoint.")

    async def _create(self, request: web.BaseRequest, zone: PreviewZone, claims, policy, origin: str) -> web.Response:
        body = await _readjson_response(request)
        try:
            namespace = check_label(_field(body, "namespace", str), "namespace")
            name = check_label(_field(body, "sandbox", str), "sandbox")
            port = _field(body, "port", int)
            check_port(str(port), "port")
        except BadSandboxRequest as e:
            raise Refusal(400, "bad_request", str(e)) from None
        if namespace not in self.previews.registry.namespaces:
            raise Refusal(404, "sandbox_not_found", f"No sandbox {name} in namespace {namespace}.")
        info = self.previews.sandbox_for(namespace, name, claims, policy)
        self.previews.check_request(info, port, policy)
        if (policy or DEFAULT_POLICY).preview_approval == "manual":
            approval = await self.approvals.request(zone, info, port, claims["sub"], policy)
            return json_response(202, {"approval_id": approval.id, "status": "pending",
                               "poll": f"{origin}{APPROVALS}/{approval.id}?wait=30s"})
        preview = await self.previews.create(zone, info, port, claims["sub"], policy)
        return json_response(201, created_view(preview, origin))

    def _list(self, request: web.BaseRequest, claims, policy, origin: str) -> web.Response:
        sandbox = request.query.get("sandbox")
        visible = [
            p.as_json(origin) for p in sorted(self.previews.table.previews(), key=lambda p: p.created_at)
            if (sandbox is None or p.sandbox == sandbox) and self._may_see(p, claims, policy)
        ]
        return json_response(200, {"previews": visible})

    def _visible(self, token: str, claims, policy) -> Preview:
        preview = self.previews.table.by_token(token) if is_token(token) else None
        if preview is None or not self._may_see(preview, claims, policy):
            raise Refusal(404, "preview_not_found", "No such preview.")
        return preview

    def _may_see(self, preview: Preview, claims, policy) -> bool:
        try:
            info = self.previews.sandbox_for(preview.namespace, preview.sandbox, claims, policy)
        except Refusal:
            return False
        return info.uid == preview.sandbox_uid  # a same-named successor's users see nothing of it


async def _readjson_response(request: web.BaseRequest) -> dict:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise Refusal(413, "body_too_large", "The request body is too large.")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise Refusal(413, "body_too_large", "The request body is too large.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Refusal(400, "bad_request", "The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise Refusal(400, "bad_request", "The body must be a JSON object.")
    return body


def _field(body: dict, name: str, kind: type):
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadSandboxRequest(f"{name} is required ({'a string' if kind is str else 'an integer'}).")
    return value


