"""A lean HTTP/1.1 upstream client: aiohttp's protocol and parser, without ClientSession.

A proxy needs little of what ClientSession does per request (URL objects, cookie jars, tracing,
redirects, auto headers), and that machinery is most of the per-request cost of a Python proxy.
This client keeps aiohttp's tested parts — the C response parser, the payload StreamReader with
flow control, the request writer with chunked encoding — and adds only a keep-alive pool.

Exceptions are aiohttp's client exceptions (ServerDisconnectedError, ClientOSError,
ServerTimeoutError, ClientPayloadError ...), so callers map one family of errors, and
ConnectFailed around the OSError / socket.gaierror / TimeoutError of a failed connect, so a
caller knows nothing of the request was sent.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import OrderedDict, deque
from time import monotonic

from aiohttp.client_exceptions import ClientPayloadError, ClientResponseError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawResponseMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict

from gateway.config.model import Endpoint
from gateway.proxy.h1limits import HEAD_END, ChunkedFraming, ResponseLimits, ResponseRefused

MAX_INTERIM_RESPONSES = 16  # 1xx (100 Continue, 103 Early Hints) skipped before the response
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 §9.2.2


class ConnectFailed(Exception):
    """No connection to the upstream could be made; `cause` says why."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class UnexpectedUpgrade(Exception):
    """The upstream answered 101 Switching Protocols to a request that did not ask to switch
    (this client never sends `Upgrade`: WebSockets are relayed elsewhere). Relaying it would
    open a tunnel past the gateway's policies."""


class UpstreamResponse:
    """Status line and headers of an upstream response; the body streams from `content`."""

    __slots__ = ("status", "reason", "headers", "content", "_connection", "_writer_task")

    def __init__(self, message: RawResponseMessage, content: StreamReader, connection: "_Connection", writer_task):
        self.status = message.code
        self.reason = message.reason
        self.headers = message.headers
        self.content = content
        self._connection = connection
        self._writer_task = writer_task

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        """Give the connection back for reuse when the exchange ended cleanly, else close it."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        writer = self._writer_task
        writer_ok = writer is None or (writer.done() and not writer.cancelled() and writer.exception() is None)
        if writer_ok and self.content.is_eof() and connection.reusable():
            connection.pool.put_back(connection)
        else:
            _discard(writer)
            connection.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        _discard(self._writer_task)
        if connection is not None:
            connection.close()


_HEAD, _BODY, _CHUNKED, _DROP = range(4)  # what the bytes an upstream sends next are
_HTTP11 = b"HTTP/1.1 "
_FINAL = (b"2", b"3", b"4", b"5")
_NO_BODY = (b"204", b"304")
_CHUNKED_WORD = re.compile(rb"chunked", re.IGNORECASE)


class _BoundedResponseHandler(ResponseHandler):
    """aiohttp's response protocol, held to ResponseLimits while reading.

    Before bytes reach aiohttp's parser, the head of each response (status line and headers, each
    1xx head on its own) is counted and fed to the parser up to its blank line, so what follows
    is known to be body; a chunked body's framing is followed by ChunkedFraming. Over a limit,
    the connection is closed and the response fails: before its head that is a 502, after it a
    cut body. Once the request is sent, the head must be complete within the idle timeout:
    a head trickled byte by byte does not re-arm it as the idle timer re-arms on every read.
    One head timer per connection, re-armed lazily, so a kept-alive connection pays no timer
    per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: ResponseLimits):
        super().__init__(loop)
        self._limits = limits
        self._parser_limits = limits.parser_limits()  # passed with every response's parameters
        self._body_ended = self._expect_head  # bound once: every plain body's eof callback
        self._reading = _HEAD
        self._head = 0  # bytes of the head being read
        self._head_tail = b""  # its last bytes, where a blank line may have begun
        self._framing: ChunkedFraming | None = None
        self._awaiting = False  # the final response's head has not arrived yet
        self._head_timeout: float | None = None  # set once the request is sent
        self._head_deadline: float | None = None  # loop time by which the head due must be in
        self._head_timer: asyncio.TimerHandle | None = None

    def set_response_params(self, **kwargs) -> None:
        self._reading, self._head, self._head_tail, self._framing = _HEAD, 0, b"", None
        self._awaiting, self._head_timeout, self._head_deadline = True, None, None
        super().set_response_params(**kwargs, **self._parser_limits)

    def request_sent(self, timeout: float | None) -> None:
        """The request is out: each head still due (1xx ones, then the response's) must be
        complete within `timeout`."""
        self._head_timeout = timeout
        self._start_head_clock()

    def data_received(self, data: bytes) -> None:
        if not data or self._payload_parser is not None or self._upgraded or self._parser is None:
            super().data_received(data)  # a resumed read, or bytes aiohttp keeps unparsed
            return
        while data and self._exception is None:
            reading = self._reading
            if reading == _HEAD:
                data = self._feed_head(data)
            elif reading == _CHUNKED:
                data = self._feed_chunked(data)
            elif reading == _BODY:
                super().data_received(data)
                return
            else:
                return  # refused: what still arrives before the close is dropped

    def feed_data(self, data, size: int = 0) -> None:
        """aiohttp queues a parsed head (with its payload): what follows it is known."""
        super().feed_data(data, size)
        message, payload = data
        self._head_deadline = None
        if message.code < 200:  # interim: the response's own head is still due
            self._expect_head()
            self._start_head_clock()
            return
        self._awaiting = False
        if payload is EMPTY_PAYLOAD:  # 204, 304, HEAD: nothing but a next head may follow
            self._expect_head()
        elif message.chunked:
            self._reading, self._framing = _CHUNKED, ChunkedFraming(self._limits)
        else:
            self._reading = _BODY
            payload.on_eof(self._body_ended)  # bytes after the body are counted as a head

    def _feed_head(self, data: bytes) -> bytes:
        budget = self._limits.head_bytes - self._head
        tail = self._head_tail
        joined = tail + data if tail else data
        found = HEAD_END.search(joined, 0, len(tail) + budget)
        if found is None:
            if len(data) > budget:
                self._refuse(ResponseRefused(message=f"The response head is over {self._limits.head_bytes} bytes."))
                return b""
            self._head += len(data)
            self._head_tail = joined[-2:]
            super().data_received(data)
            return b""
        cut = found.end() - len(tail)
        heads = len(self._buffer)
        if (cut < len(data) and not tail and data.startswith(_HTTP11) and data[9:10] in _FINAL
                and data[9:12] not in _NO_BODY and not self._skip_payload
                and _CHUNKED_WORD.search(data, 0, cut) is None):
            # A head surely followed by a body that is neither chunked nor another head.
            super().data_received(data)  # the common case, in one go: a head, then its body
            if len(self._buffer) > heads + 1:  # and a response nobody asked for (in this read)
                self._refuse(ResponseRefused(message="The upstream sent a response nobody asked for."))
                return b""
            cut = len(data)
        else:
            super().data_received(data if cut == len(data) else data[:cut])
        if self._exception is None and len(self._buffer) == heads and self._reading == _HEAD:
            # Our blank line is not the parser's: refuse rather than guess where the body starts.
            self._refuse(ResponseRefused(message="The response head could not be delimited."))
            return b""
        return data[cut:] if cut < len(data) else b""

    def _feed_chunked(self, data: bytes) -> bytes:
        try:
            end = self._framing.feed(data)
        except ResponseRefused as exc:
            self._refuse(exc)
            return b""
        if end is None:
            super().data_received(data)
            return b""
        super().data_received(data[:end])
        if self._reading == _CHUNKED:  # the body ended: anything more would be a new head
            self._expect_head()
        return data[end:]

    def _expect_head(self) -> None:
        self._reading, self._head, self._head_tail, self._framing = _HEAD, 0, b"", None

    def _refuse(self, exc: ResponseRefused) -> None:
        """Fail the response (or its body, once the head has been handed on) and close."""
        self._reading, self._head_deadline = _DROP, None
        self.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def set_exception(self, exc: BaseException, *cause) -> None:
        # aiohttp fails only the queue of heads when its parser refuses body bytes; a body
        # being relayed would then wait for bytes that never come. Fail it too.
        payload = self._payload
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            failure = exc  # a timeout stays a timeout (504 while nothing was sent)
            if isinstance(exc, HttpProcessingError):
                failure = ClientPayloadError(f"The response body failed: {type(exc).__name__}")
            payload.set_exception(failure)
        super().set_exception(exc, *cause)

    def _start_head_clock(self) -> None:
        if not (self._awaiting and self._head_timeout and self._reading == _HEAD):
            return
        self._head_deadline = deadline = self._loop.time() + self._head_timeout
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(deadline, self._check_head_deadline)

    def _check_head_deadline(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # no head due (any more)
        if self._loop.time() < deadline:
            self._head_timer = self._loop.call_at(deadline, self._check_head_deadline)
            return
        self._head_deadline = None
        self._on_read_timeout()  # aiohttp's own: a ServerTimeoutError, so a 504

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def close(self) -> None:
        self._cancel_head_timer()
        super().close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


class _Connection:
    __slots__ = ("protocol", "pool", "idle_since", "reused")

    def __init__(self, protocol: ResponseHandler, pool: "_HostPool"):
        self.protocol = protocol
        self.pool = pool
        self.idle_since = 0.0
        self.reused = False

    def reusable(self) -> bool:
        return self.protocol.is_connected() and not self.protocol.should_close

    def close(self) -> None:
        self.protocol.close()


class _HostPool:
    """Idle keep-alive connections to one endpoint, most recently used last."""

    def __init__(self, client: "H1Client", endpoint: Endpoint, scheme: str, ssl_context, server_hostname):
        self.client = client
        self.endpoint = endpoint
        self.ssl = ssl_context if scheme == "https" else None
        self.server_hostname = server_hostname
        self.idle: deque[_Connection] = deque()
        self.retired = False  # evicted from the client: connections coming back are closed

    def take(self) -> _Connection | None:
        while self.idle:
            connection = self.idle.pop()
            self.client.idle_count -= 1
            if connection.reusable():
                connection.reused = True
                return connection
            connection.close()
        return None

    def put_back(self, connection: _Connection) -> None:
        client = self.client
        if client.closed or self.retired:
            connection.close()
            return
        if len(self.idle) >= client.max_idle_per_pool:
            self.drop_oldest()
        elif client.idle_count >= client.max_idle:
            client.drop_oldest_idle()
        connection.idle_since = monotonic()
        self.idle.append(connection)
        client.idle_count += 1

    def drop_oldest(self) -> None:
        self.idle.popleft().close()
        self.client.idle_count -= 1

    def retire(self) -> None:
        self.retired = True
        self.close_idle(float("inf"))

    async def connect(self, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        limits = self.client.limits
        factory = lambda: _BoundedResponseHandler(loop, limits)  # noqa: E731
        async with asyncio.timeout(timeout):
            if endpoint.unix_path is not None:
                _, protocol = await loop.create_unix_connection(factory, endpoint.unix_path)
            else:
                kwargs = {}
                if self.ssl is not None:
                    kwargs = {"ssl": self.ssl, "server_hostname": self.server_hostname or endpoint.host}
                _, protocol = await loop.create_connection(factory, endpoint.host, endpoint.port, **kwargs)
        return _Connection(protocol, self)

    def close_idle(self, older_than: float) -> None:
        keep: deque[_Connection] = deque()
        for connection in self.idle:
            if connection.idle_since < older_than or not connection.reusable():
                connection.close()
            else:
                keep.append(connection)
        self.client.idle_count -= len(self.idle) - len(keep)
        self.idle = keep


class H1Client:
    """Pools per (endpoint, scheme, TLS settings). Sandbox and preview targets are many distinct
    pod addresses, so everything here is bounded: at most `max_pools` pools (the least recently
    used one is dropped, closing its idle connections), `max_idle_per_pool` idle connections in
    one pool and `max_idle` in all (the oldest idle connection is closed first)."""

    def __init__(self, *, keepalive_seconds: float = 60.0, limits: ResponseLimits = ResponseLimits(),
                 max_pools: int = 1024, max_idle_per_pool: int = 64, max_idle: int = 1024):
        self.keepalive_seconds = keepalive_seconds
        self.limits = limits
        self.max_pools = max_pools
        self.max_idle_per_pool = max_idle_per_pool
        self.max_idle = max_idle
        self.idle_count = 0  # idle connections in every pool
        self.closed = False
        self._pools: OrderedDict[tuple, _HostPool] = OrderedDict()  # least recently used first
        self._verified = ssl.create_default_context()
        self._unverified = ssl.create_default_context()
        self._unverified.check_hostname = False
        self._unverified.verify_mode = ssl.CERT_NONE
        self._reaper: asyncio.Task | None = None

    def _pool(self, endpoint: Endpoint, scheme: str, verify_tls: bool, server_hostname: str | None) -> _HostPool:
        key = (endpoint, scheme, verify_tls, server_hostname)
        pool = self._pools.get(key)
        if pool is None:
            if len(self._pools) >= self.max_pools:
                self._pools.popitem(last=False)[1].retire()
            context = self._verified if verify_tls else self._unverified
            pool = self._pools[key] = _HostPool(self, endpoint, scheme, context, server_hostname)
            if self._reaper is None:
                self._reaper = asyncio.ensure_future(self._reap_idle())
        else:
            self._pools.move_to_end(key)
        return pool

    @property
    def pool_count(self) -> int:
        return len(self._pools)

    def drop_oldest_idle(self) -> None:
        """Close one idle connection of the least recently used pool that has one."""
        for pool in self._pools.values():
            if pool.idle:
                pool.drop_oldest()
                return

    async def request(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: CIMultiDict,
        body: StreamReader | None,
        *,
        scheme: str = "http",
        verify_tls: bool = True,
        server_hostname: str | None = None,
        connect_timeout: float | None = 5.0,
        read_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; returns once the response headers are in (1xx skipped)."""
        pool = self._pool(endpoint, scheme, verify_tls, server_hostname)
        connection = pool.take()
        if connection is not None:
            try:
                return await self._exchange(connection, method, target, headers, body, read_timeout)
            except (ServerDisconnectedError, ConnectionResetError, BrokenPipeError):
                # Most likely a kept-alive connection the upstream had just closed. Send again
                # on a fresh connection only what may safely run twice (RFC 9110 §9.2.2) and
                # has no body already taken from the client.
                if body is not None or method not in IDEMPOTENT_METHODS:
                    raise
        try:
            connection = await pool.connect(connect_timeout)
        except (OSError, TimeoutError) as exc:  # refused, unresolved, TLS handshake, timed out
            raise ConnectFailed(exc) from exc
        return await self._exchange(connection, method, target, headers, body, read_timeout)

    async def _exchange(self, connection: _Connection, method, target, headers, body, read_timeout) -> UpstreamResponse:
        protocol = connection.protocol
        protocol.set_response_params(
            skip_payload=method == "HEAD",
            auto_decompress=False,
            read_timeout=read_timeout,
        )
        writer = StreamWriter(protocol, asyncio.get_running_loop())
        if body is not None and "Content-Length" not in headers:
            writer.enable_chunking()
            headers["Transfer-Encoding"] = "chunked"
        try:
            await writer.write_headers(f"{method} {target} HTTP/1.1", headers)
            writer_task = None
            if body is None:
                await writer.write_eof()
                protocol.request_sent(read_timeout)
            else:
                writer_task = asyncio.ensure_future(_send_body(writer, body))
                writer_task.add_done_callback(lambda sent: _body_sent(sent, protocol, read_timeout))
            for _ in range(MAX_INTERIM_RESPONSES + 1):
                try:
                    message, payload = await _read_response(protocol, writer_task)
                except HttpProcessingError as exc:
                    raise ClientResponseError(None, (), status=exc.code, message=exc.message) from exc
                if message.code == 101:
                    raise UnexpectedUpgrade()  # the connection is closed below, its bytes unread
                if not 100 <= message.code < 200:
                    break
            else:  # an upstream that sends 1xx forever would keep the request busy forever
                raise ClientResponseError(None, (), status=502, message="too many interim (1xx) responses")
        except BaseException:
            _discard(writer_task)
            connection.close()
            raise
        return UpstreamResponse(message, payload, connection, writer_task)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.keepalive_seconds))
            cutoff = monotonic() - self.keepalive_seconds
            for pool in list(self._pools.values()):
                pool.close_idle(cutoff)

    async def close(self) -> None:
        self.closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for pool in self._pools.values():
            pool.retire()
        self._pools.clear()


async def _read_response(protocol: ResponseHandler, writer_task: asyncio.Task | None):
    """The next response message; a failure to send the body (e.g. the client's upload broke
    off) ends the wait instead of leaving the upstream waiting for the rest."""
    if writer_task is None or writer_task.done():
        if writer_task is not None and not writer_task.cancelled() and writer_task.exception():
            raise writer_task.exception()
        return await protocol.read()
    read = asyncio.ensure_future(protocol.read())
    await asyncio.wait((read, writer_task), return_when=asyncio.FIRST_COMPLETED)
    if not read.done() and writer_task.exception() is not None:
        read.cancel()
        raise writer_task.exception()
    return await read


def _body_sent(task: asyncio.Task, protocol: _BoundedResponseHandler, read_timeout: float | None) -> None:
    if not task.cancelled() and task.exception() is None:
        protocol.request_sent(read_timeout)


def _discard(task: asyncio.Task | None) -> None:
    """Cancel a body writer and consume its outcome so nothing is logged as unretrieved."""
    if task is None:
        return
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()


async def _send_body(writer: StreamWriter, body: StreamReader) -> None:
    async for chunk in body.iter_any():
        await writer.write(chunk)
    await writer.write_eof()
