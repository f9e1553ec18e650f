"""Stand-in for the platform's web frontend (Service `frontend.platform:3000`).

Serves a single-page app: `/` (and any other path, as an SPA's client-side router expects) is
the index page listing the URLs to try; `/assets/app.js` is its script, which calls the API
stand-in, follows its event stream and echoes over its WebSocket, all through the gateway. A
missing asset is a 404, not the index, so a broken asset link shows up as one.
"""

from __future__ import annotations

import html

from aiohttp import web

from gateway.devstack.urls import try_commands, try_urls

INDEX = web.AppKey("index", str)

APP_JS = """\
// Exercises the API stand-in through the gateway: JSON, Server-Sent Events and a WebSocket.
const out = (id, text) => { document.getElementById(id).textContent += text + "\\n"; };

fetch("/api/hello?from=frontend")
  .then((r) => r.json())
  .then((body) => out("api", JSON.stringify(body, null, 2)))
  .catch((err) => out("api", "error: " + err));

const events = new EventSource("/api/events");
events.addEventListener("tick", (e) => out("events", e.data));
events.onerror = () => events.close();

const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/ws");
ws.onopen = () => ws.send("hello through the gateway");
ws.onmessage = (e) => { out("ws", "echo: " + e.data); ws.close(1000); };
ws.onerror = () => out("ws", "error");
"""


def render_index(public_url: str, sandbox_port: int) -> str:
    links = "\n".join(
        f'      <li><a href="{html.escape(url)}">{html.escape(url)}</a></li>' for url in try_urls(public_url)
    )
    commands = html.escape("\n".join(try_commands(public_url, sandbox_port)))
    return f"""<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>Sandgate dev</title>
  </head>
  <body>
    <h1>Sandgate dev stack</h1>
    <p>This page comes from the frontend stand-in, through the gateway. Try:</p>
    <ul>
{links}
    </ul>
    <p>From a shell, including the OAuth tour of <code>/mcp</code>, the demo sandbox and a preview of it:</p>
    <pre id="commands">{commands}</pre>
    <h2>/api/hello</h2><pre id="api"></pre>
    <h2>/api/events</h2><pre id="events"></pre>
    <h2>/api/ws</h2><pre id="ws"></pre>
    <script src="/assets/app.js"></script>
  </body>
</html>
"""


async def index(request: web.Request) -> web.Response:
    return web.Response(text=request.app[INDEX], content_type="text/html", headers={"Cache-Control": "no-cache"})


async def app_js(request: web.Request) -> web.Response:
    return web.Response(
        text=APP_JS, content_type="text/javascript", headers={"Cache-Control": "public, max-age=300"}
    )


async def missing_asset(request: web.Request) -> web.Response:
    raise web.HTTPNotFound(text="no such asset\n")


def make_app(public_url: str, sandbox_port: int) -> web.Application:
    app = web.Application()
    app[INDEX] = render_index(public_url, sandbox_port)
    app.router.add_get("/assets/app.js", app_js)
    app.router.add_get("/assets/{name:.*}", missing_asset)
    app.router.add_get("/{tail:.*}", index)
    return app
