"""The HTTP/1.1 server protocol: aiohttp's, with limits held while reading and errors answered
in Sandgate's own format.

aiohttp's parser already refuses malformed request lines and headers, `Content-Length` together
with `Transfer-Encoding`, and repeated `Content-Length`/`Host`. Here its plain-text error pages
become SPEC §3.3 JSON bodies, and header-size overflows become 431 instead of 400.

What aiohttp does not bound is added in `data_received`, before bytes reach its parser: the
request line and headers together are counted as they arrive (431 once over the port's limit),
they must be complete within the header timeout, and after the first refusal or parse error
nothing more is parsed or kept (the parser would keep a fresh error, with a copy of the chunk,
for every further chunk). Only the bytes of a request's head are counted: body chunks and
upgraded streams pass with one test.
"""

from __future__ import annotations

import os
from typing import Callable

from aiohttp import web
from aiohttp import HttpVersion10
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from gateway.policy.model import ListenerLimits
from gateway.server.errors import error_response

HTTP09 = web.RequestKey("sandgate_http09", bool)

MAX_HEADERS = 256  # header lines per request; their bytes are bounded by the header limit


class HeaderSectionTooLarge(HttpProcessingError):
    """The request line and headers went over the port's header limit while being read."""

    code = 431

    def __init__(self, limit: int):
        super().__init__(message=f"The request line and headers are over {limit} bytes.")


class _GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler, held to its port's ListenerLimits.

    ClientTrafficPolicy connection.connectionLimit applies as Envoy applies it: a connection over
    `value` is closed unread (after `closeDelay`, if set, held without reading and not counted);
    the response to request `maxRequestsPerConnection` says `Connection: close`; once
    `maxConnectionDuration` has passed, an idle connection is closed at once and a busy one after
    the response in flight. The idle timeout is aiohttp's keep-alive timer (from connect, and
    after each response); the header timeout runs from a request's first byte."""

    def connection_made(self, transport) -> None:
        self.listener = listener = self._manager.listener_limits()
        self._keepalive_timeout = listener.idle_timeout  # aiohttp arms its idle timer with it
        self.limits = limits = listener.connection
        self.rejected = False
        self.started_requests = 0
        self.draining = self._manager.draining
        self._expiry = None
        # Bytes of the request head being read; None while a body or an upgraded stream is read.
        self._head: int | None = 0
        self._body = None  # the payload of the last request parsed: its end starts the next head
        self._head_deadline = 0.0
        self._head_timer = None
        self._refused = False  # a refusal or parse error is being answered: nothing more is read
        super().connection_made(transport)
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
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        rest = self._feed(data)
        while rest:  # a head ended inside the chunk: a body or the next request follows
            rest = self._feed(rest)

    def _feed(self, data: bytes) -> bytes:
        """Feed `data` to aiohttp, counting it while it is part of a request head; returns what
        follows a head that ended inside the part of it that fits in the budget, still to be fed."""
        if self._refused or self._force_close or self._close:
            return b""
        if self._head is None:
            body = self._body
            if self._upgraded or self._payload_parser is not None or (body is not None and not body.is_eof()):
                self._parse(data)  # a body: its end may start the next request
                return b""
            self._head = 0  # the body ended exactly at the end of an earlier chunk
        if not self._head and data:
            self._start_head_timer()
        budget = self.listener.header_bytes - self._head
        if len(data) <= budget:
            self._parse(data)
            return b""
        # Over the limit unless a head ends inside what fits in the budget.
        if not self._parse(data[:budget]):
            if not self._refused:
                self._refuse(HeaderSectionTooLarge(self.listener.header_bytes))
            return b""
        return data[budget:]

    def _parse(self, piece: bytes) -> bool:
        """Give `piece` to aiohttp's parser and account for it; whether a request was parsed.

        The bytes of `piece` after the last request parsed from it (and after that request's
        body, when it ended inside `piece`) are the start of the next head: they are charged to
        it and its header timer starts. A request's own head is measured from what the parser
        made of it, so a head over the limit is refused even when it came in with a body's end
        or after another request in the same read, never served."""
        body = self._body if self._head is None else None
        body_before = body.total_bytes if body is not None else 0
        head_before = self._head or 0
        count = self._request_count
        super().data_received(piece)
        parsed = self._request_count - count
        accounted = body.total_bytes - body_before if body is not None else 0
        if not parsed:
            if self._head is not None:
                self._head += len(piece)
            elif body is not None and body.is_eof() and not self._upgraded and self._payload_parser is None:
                self._next_head(len(piece) - accounted)
            return False
        if parsed == 1 and body is None and not self._upgraded and piece.endswith(b"\r\n\r\n"):
            message, payload = self._messages[-1]
            if payload is EMPTY_PAYLOAD and not isinstance(message, _ErrInfo):
                # The common case, without measuring: one body-less request, counted whole as it
                # came, ending exactly where the read did.
                self._body, self._head = payload, 0
                return True
        messages = list(self._messages)[-parsed:]
        accounted -= head_before  # counted with earlier pieces, and part of the first head here
        for index, (message, payload) in enumerate(messages):
            if isinstance(message, _ErrInfo):
                self._stop_reading()  # aiohttp answers it (handle_error), then the connection closes
                return True
            size = _head_size(message)
            if size > self.listener.header_bytes:
                for _ in range(len(messages) - index):  # neither it nor what follows is served
                    self._messages.pop()
                self._refuse(HeaderSectionTooLarge(self.listener.header_bytes))
                return True
            accounted += size + payload.total_bytes
        self._body = payload
        if self._upgraded or not payload.is_eof():
            self._head = None
        else:
            self._next_head(len(piece) - accounted)
        return True

    def _next_head(self, started: int) -> None:
        """A request is done: `started` bytes of the next head have been read already."""
        self._head = max(started, 0)
        if self._head:
            self._start_head_timer()
            if self._head > self.listener.header_bytes:
                self._refuse(HeaderSectionTooLarge(self.listener.header_bytes))

    def _refuse(self, exc: HttpProcessingError) -> None:
        """Answer `exc` (after any request in flight), then close; read nothing more."""
        self._stop_reading()
        self._messages.append((_ErrInfo(status=exc.code, exc=exc, message=exc.message), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _stop_reading(self) -> None:
        # Still read (and drop) what arrives, so that the answer is not lost to a reset when the
        # connection closes with unread data.
        self._refused = True
        self._head = 0

    def _start_head_timer(self) -> None:
        """A request's first byte: its headers are due within the header timeout. One timer per
        connection, re-armed lazily, so a fast keep-alive connection pays no timer per request."""
        loop = self._loop
        self._head_deadline = loop.time() + self.listener.headers_timeout
        if self._head_timer is None:
            self._head_timer = loop.call_at(self._head_deadline, self._check_head_deadline)

    def _check_head_deadline(self) -> None:
        self._head_timer = None
        if not self._head or self._refused:
            return  # no request head being read
        if self._loop.time() < self._head_deadline:
            self._head_timer = self._loop.call_at(self._head_deadline, self._check_head_deadline)
            return
        self._stop_reading()
        if self._request_in_progress:
            self.close()  # a pipelined head is late: the response in flight is still sent
        else:
            self.force_close()

    def _process_keepalive(self) -> None:
        if self._head:
            # A request head is arriving: the header timeout governs it, not the idle timeout.
            # aiohttp arms the idle timer again after the response.
            self._keepalive_handle = None
            return
        super()._process_keepalive()

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
        if isinstance(exc, (LineTooLong, HeaderSectionTooLarge)) or (
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


def _head_size(message) -> int:
    """The bytes of a parsed request's line and headers, as a client sends them plainly."""
    size = len(message.method) + len(message.path) + 14  # " ", " HTTP/1.1\r\n" and the final CRLF
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4
    return size


def _accept(request) -> str:
    try:
        return request.headers.get("Accept", "")
    except Exception:  # noqa: BLE001 - the headers may be what failed to parse
        return ""


class _GatewayRequest(web.BaseRequest):
    """A request whose response says `Connection: close` once its connection is draining
    (SIGTERM, or maxConnectionDuration), even when the drain began after the request did."""

    @property
    def keep_alive(self) -> bool:
        return super().keep_alive and not self.protocol.draining


class GatewayServer(web.Server):
    def __init__(self, handler, *, listener_limits: Callable[[], ListenerLimits],
                 on_rejected: Callable[[], None], **kwargs):
        super().__init__(handler, **kwargs)
        self.listener_limits = listener_limits  # the port's current limits
        self.on_rejected = on_rejected  # called for each connection closed for being over the limit
        self.rejected_open = 0  # connections over the limit, held open for closeDelay
        self.draining = False

    def __call__(self) -> RequestHandler:
        return _GatewayRequestHandler(self, loop=self._loop, **self._kwargs)

    def start_draining(self) -> None:
        """From now on every response, on open connections and on any still accepted, says
        `Connection: close`."""
        self.draining = True
        for connection in self.connections:
            connection.draining = True


def _make_request(message, payload, protocol, writer, task) -> web.BaseRequest:
    """aiohttp parses a request line without a version as HTTP/0.9 and would answer with an
    HTTP/0.9 status line. Such requests are marked and answered with an HTTP/1.0 400."""
    http09 = message.version < HttpVersion10
    if http09:
        message = message._replace(version=HttpVersion10, should_close=True)
    elif protocol.limits is not None and protocol.close_after() and not message.should_close:
        message = message._replace(should_close=True)  # its response says Connection: close
    request = _GatewayRequest(message, payload, protocol, writer, task, protocol._loop)
    if http09:
        request[HTTP09] = True
    return request


def make_server(handler, listener_limits: Callable[[], ListenerLimits],
                on_rejected: Callable[[], None] = lambda: None, *,
                max_header_bytes: int, max_header_line_bytes: int) -> GatewayServer:
    """The parser's own limits are the widest any request may use (the request line may use the
    whole header budget, one header line `max_header_line_bytes`); the port's header limit is
    counted while reading."""
    return GatewayServer(
        handler, listener_limits=listener_limits, on_rejected=on_rejected, request_factory=_make_request,
        handler_cancellation=True, access_log=None, max_line_size=max_header_bytes,
        max_field_size=max_header_line_bytes, max_headers=MAX_HEADERS,
        # Request bodies pass as sent (SPEC §3.1: Content-Encoding untouched): aiohttp would
        # otherwise inflate a gzip body, forward it under its gzip header, and spend CPU and
        # memory on whatever a client compressed.
        auto_decompress=False,
    )
