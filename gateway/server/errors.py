"""Error responses (SPEC §3.3): JSON for API clients, an HTML page for browsers.

JSON shape, always: {"error", "message", "request_id"} plus "violations" for policy denials.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.refusal import Refusal

# What the gateway's own answers name as Server (aiohttp would add its name and version).
SERVER = "sandgate"
_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_HTML_APP_KEY = web.AppKey("sandgate_error_templates", jinja2.Environment)


def _environment() -> jinja2.Environment:
    # aiohttp_jinja2 configures the environment (autoescaping on); the low-level server that
    # serves the gateway has no Application, so the environment is kept here and rendered directly.
    holder = web.Application()
    return aiohttp_jinja2.setup(
        holder, loader=jinja2.FileSystemLoader(str(_TEMPLATES)), app_key=_HTML_APP_KEY
    )


_ENV = _environment()
_TEMPLATE = _ENV.get_template("error.html")


def prefers_html(accept: str) -> bool:
    """True when the client ranks text/html above JSON (browsers do; API clients do not)."""
    if "text/html" not in accept:
        return False
    best_html = best_json = -1.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media == "text/html":
            best_html = max(best_html, q)
        elif media in ("application/json", "*/*") or media.endswith("+json"):
            best_json = max(best_json, q if media != "*/*" else q - 0.001)
    return best_html > 0 and best_html >= best_json


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    *,
    accept: str = "",
    violations: list[dict] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict = {"error": code, "message": message, "request_id": request_id}
    if violations is not None:
        body["violations"] = violations
    if prefers_html(accept):
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        text = _TEMPLATE.render(status=status, reason=reason, **body)
        response = web.Response(status=status, text=text, content_type="text/html", headers=headers)
    else:
        response = web.Response(
            status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers
        )
    response.headers["X-Request-Id"] = request_id
    response.headers["Cache-Control"] = "no-store"
    response.headers["Server"] = SERVER
    return response


def json_response(status: int, payload: dict) -> web.Response:
    """A JSON answer of the gateway's own API (previews, approvals): never cached."""
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json",
                        headers={"Server": SERVER, "Cache-Control": "no-store"})


def refusal_response(refusal: Refusal, request_id: str, accept: str = "") -> web.Response:
    """The answer to a Refusal: §3.3's body, with `violations` for a policy denial."""
    return error_response(refusal.status, refusal.code, refusal.message, request_id, accept=accept,
                          violations=refusal.violations, headers=refusal.headers)
