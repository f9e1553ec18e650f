"""The HTTP/1.1 server protocol: aiohttp's, with errors answered in Sandgate's own format.

aiohttp's parser already refuses malformed request lines and headers, `Content-Length` together
with `Transfer-Encoding`, and repeated `Content-Length`/`Host`. Here its plain-text error pages
become SPEC §3.3 JSON bodies, and header-size overflows become 431 instead of 400.
"""

from __future__ import annotations

import os
from typing import Callable

from aiohttp import web
from aiohttp import HttpVersion10
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.policy.model import ConnectionLimits
from gateway.server.errors import error_response

HTTP09 = web.RequestKey("sandgate_http09", bool)

# Parser limits: a single header line may use the whole 64 KiB budget; the total is checked
# per request by the gateway itself (SPEC §2.2).
PARSER_LIMITS = {"max_line_size": 65536, "max_field_size": 65536, "max_headers": 256}


class _GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler, with ClientTrafficPolicy connection.connectionLimit applied
    as Envoy applies it: a connection over `value` is closed unread (after `closeDelay`, if set,
    held without reading and not counted); the response to request `maxRequestsPerConnection`
    says `Connection: close`; once `maxConnectionDuration` has passed, an idle connection is
    closed at once and a busy one after the response in flight."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.rejected = False
        self.started_requests = 0
        self.draining = False
        self.limits = limits = self._manager.connection_limits()
        self._expiry = None
        if limits is None:
            return
        manager = self._manager
        if limits.limit is not None and len(manager.connections) - manager.rejected_open > limits.limit:
            self.rejected = True
            manager.rejected_open += 1
            manager.on_rejected()
            transport.pause_reading()
            if limits.close_delay:
                self._loop.call_later(limits.close_delay, transport.close)
            else:
                self.force_close()
                transport.close()
            return
        if limits.max_seconds:
            self._expiry = self._loop.call_later(limits.max_seconds, self._drain)

    def connection_lost(self, exc) -> None:
        if self.rejected:
            self.rejected = False
            self._manager.rejected_open -= 1
        if self._expiry is not None:
            self._expiry.cancel()
        super().connection_lost(exc)

    def close_after(self) -> bool:
        """Called as each request starts on a connection with limits: whether it is its last."""
        self.started_requests += 1
        max_requests = self.limits.max_requests
        return self.draining or bool(max_requests and self.started_requests >= max_requests)

    def _drain(self) -> None:
        self.draining = True
        if self._waiter is not None and not self._waiter.done():
            self.force_close()  # idle, waiting for a request (aiohttp's own keep-alive check)
        else:
            self.close()  # busy: aiohttp closes it once the response in flight is sent

    def handle_error(self, request, status=500, exc=None, message=None):
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error page")
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, HttpProcessingError) and "Too many headers" in (exc.message or "")
        ):
            status, code, text = 431, "headers_too_large", "The request headers are too large."
        elif status == 400 or isinstance(exc, HttpProcessingError):
            status, code, text = 400, "bad_request", "The request could not be parsed."
        else:
            status, code, text = 500, "internal_error", "The gateway failed to handle the request."
            self.log_exception("unhandled error while handling a request", exc_info=exc)
        response = error_response(status, code, text, os.urandom(16).hex(), accept=_accept(request))
        response.force_close()
        return response


def _accept(request) -> str:
    try:
        return request.headers.get("Accept", "")
    except Exception:  # noqa: BLE001 - the headers may be what failed to parse
        return ""


class GatewayServer(web.Server):
    def __init__(self, handler, *, connection_limits: Callable[[], ConnectionLimits | None],
                 on_rejected: Callable[[], None], **kwargs):
        super().__init__(handler, **kwargs)
        self.connection_limits = connection_limits  # the port's current limits, if any
        self.on_rejected = on_rejected  # called for each connection closed for being over the limit
        self.rejected_open = 0  # connections over the limit, held open for closeDelay

    def __call__(self) -> RequestHandler:
        return _GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


def _make_request(message, payload, protocol, writer, task) -> web.BaseRequest:
    """aiohttp parses a request line without a version as HTTP/0.9 and would answer with an
    HTTP/0.9 status line. Such requests are marked and answered with an HTTP/1.0 400."""
    http09 = message.version < HttpVersion10
    if http09:
        message = message._replace(version=HttpVersion10, should_close=True)
    elif protocol.limits is not None and protocol.close_after() and not message.should_close:
        message = message._replace(should_close=True)  # its response says Connection: close
    request = web.BaseRequest(message, payload, protocol, writer, task, protocol._loop)
    if http09:
        request[HTTP09] = True
    return request


def make_server(handler, connection_limits: Callable[[], ConnectionLimits | None] = lambda: None,
                on_rejected: Callable[[], None] = lambda: None) -> GatewayServer:
    return GatewayServer(
        handler, connection_limits=connection_limits, on_rejected=on_rejected, request_factory=_make_request,
        handler_cancellation=True, access_log=None, **PARSER_LIMITS
    )
