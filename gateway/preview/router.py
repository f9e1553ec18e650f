"""A PreviewZone backend: the preview API on the platform's host, preview hosts themselves."""

from __future__ import annotations

from typing import Callable, Mapping

from aiohttp import web

from gateway.config.model import PreviewZone
from gateway.policy.model import SandboxPolicy
from gateway.preview.api import PreviewApi, is_api_path
from gateway.preview.service import Previews
from gateway.preview.tokens import token_from_host
from gateway.server.errors import refusal_response
from gateway.refusal import Refusal
from gateway.sandbox.router import SandboxTarget


class PreviewRouter:
    def __init__(self, previews: Previews, api: PreviewApi):
        self.previews = previews
        self.api = api

    async def route(self, request: web.BaseRequest, zone: PreviewZone, *, host: str, path: str,
                    claims: Mapping | None, policy: Callable[[], SandboxPolicy | None], request_id: str,
                    origin: Callable[[], str]) -> SandboxTarget | web.StreamResponse:
        """`policy` and `origin` are asked for only where they are used (the API, owner mode)."""
        try:
            token = token_from_host(host, zone.zone)
            if token is not None:  # every path of a preview host is the sandbox app's, the API's too
                owner_policy = policy() if zone.access_mode == "owner" else None
                return await self.previews.target(zone, host, token, path, claims, owner_policy)
            if is_api_path(path):
                return await self.api.handle(request, zone, path, claims, policy(), origin())
            raise Refusal(404, "preview_not_found", "No preview at this host.")
        except Refusal as refusal:
            return refusal_response(refusal, request_id, request.headers.get("Accept", ""))
