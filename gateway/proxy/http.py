"""Streaming HTTP forwarding: one request in, one upstream exchange, bytes relayed both ways.

This module knows nothing about routes or policies. It receives a ForwardPlan (where to go and
with which headers) and either returns a prepared response or raises a Refusal before the
first byte of the response was sent. After that point a failure can only cut the connection,
so the client sees a truncated response rather than a forged complete one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from time import monotonic
from typing import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.config.model import Endpoint
from gateway.proxy.headers import end_to_end
from gateway.proxy.h1client import ConnectFailed, UnexpectedUpgrade, UpstreamResponse
from gateway.refusal import Refusal
from gateway.proxy.retry import RetryPlan, attempts_allowed, pause_before, retry_on_failure, retry_on_response
from gateway.proxy.upstream import UpstreamPool

# Whole small bodies go out in one write; larger ones (and unknown lengths) stream.
SMALL_BODY = 64 * 1024


@dataclass(slots=True)
class ForwardPlan:
    endpoint: Endpoint
    scheme: str
    method: str
    path_and_query: str
    headers: CIMultiDict
    connect_timeout: float
    idle_timeout: float
    deadline: float | None  # monotonic time by which the whole exchange must be over
    edit_response_headers: Callable[[CIMultiDict], None] | None = None
    verify_tls: bool = True
    server_hostname: str | None = None
    body_limit: int | None = None  # bytes; a larger chunked body is refused with 413
    retry: RetryPlan | None = None


@dataclass(slots=True)
class Exchange:
    """What the caller may want to record about a finished exchange."""

    status: int = 0
    upstream_seconds: float = 0.0
    bytes_sent: int = 0
    retries: int = 0
    endpoint: Endpoint | None = None  # of the last retry, when there was one


async def forward(request: web.BaseRequest, plan: ForwardPlan, pool: UpstreamPool, exchange: Exchange) -> web.StreamResponse:
    body = request.content if request.body_exists else None
    if body is not None and plan.body_limit is not None and request.content_length is None:
        body = _LimitedBody(body, plan.body_limit)
    started = monotonic()
    try:
        async with _deadline(plan.deadline):
            if plan.retry is None:
                upstream, deadline = await _send(plan, pool, plan.endpoint, body), plan.deadline
            else:
                upstream, deadline = await _with_retries(request, plan, pool, body, exchange)
    except BaseException as exc:  # noqa: BLE001 - every failure maps to a status
        raise _as_proxy_error(exc) from exc
    exchange.upstream_seconds = monotonic() - started
    exchange.status = upstream.status
    try:
        headers = end_to_end(upstream.headers)
        if plan.edit_response_headers is not None:
            plan.edit_response_headers(headers)
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY and deadline is None:
            return await _whole(upstream, headers, exchange)
        return await _stream(request, upstream, headers, deadline, exchange)
    finally:
        upstream.release()


async def _with_retries(request: web.BaseRequest, plan: ForwardPlan, pool: UpstreamPool, body, exchange: Exchange):
    """The upstream response to relay and the deadline of its attempt, after as many attempts as
    the retry policy allows and calls for; the failure of the last attempt is raised."""
    retry = plan.retry
    attempts = attempts_allowed(retry.policy, plan.method, request.body_exists, request.content_length)
    if attempts > 1 and body is not None:
        body = _Replayable(await request.read())
    endpoint = plan.endpoint
    upstream, failure, deadline = await _attempt(plan, pool, endpoint, body)
    tried: set[Endpoint] = set()
    for retry_number in range(1, attempts):
        if failure is not None:
            wanted = retry_on_failure(retry.policy, failure)
        else:
            wanted = retry_on_response(retry.policy, upstream.status, upstream.headers)
        if not wanted or not retry.budget.take():
            break
        try:
            if upstream is not None:
                upstream.close()  # its body is not wanted; the connection goes with it
            tried.add(endpoint)
            endpoint = retry.next_endpoint(tried)
            await asyncio.sleep(pause_before(retry.policy, retry_number))
            upstream, failure, deadline = await _attempt(plan, pool, endpoint, body)
            exchange.retries, exchange.endpoint = retry_number, endpoint
        finally:
            retry.budget.give_back()
    if failure is not None:
        raise failure
    return upstream, deadline


async def _attempt(plan: ForwardPlan, pool: UpstreamPool, endpoint: Endpoint, body):
    """(response, None, deadline) or (None, failure, deadline) of one attempt; a per-try timeout
    bounds it and, once it answers, the relay of its body."""
    per_try = plan.retry.policy.per_try_timeout
    deadline = plan.deadline
    if per_try is not None:
        deadline = min(deadline or float("inf"), monotonic() + per_try)
    try:
        async with _deadline(deadline if per_try is not None else None):
            upstream = await _send(plan, pool, endpoint, body)
    except Exception as exc:  # noqa: BLE001 - a cancelled request (BaseException) is never retried
        return None, exc, deadline
    return upstream, None, deadline


def _send(plan: ForwardPlan, pool: UpstreamPool, endpoint: Endpoint, body):
    """One upstream request (a coroutine; a plain function, so no frame is added to await)."""
    return pool.http.request(
        endpoint,
        plan.method,
        plan.path_and_query,
        plan.headers,
        body,
        scheme=plan.scheme,
        verify_tls=plan.verify_tls,
        server_hostname=plan.server_hostname,
        connect_timeout=plan.connect_timeout,
        read_timeout=plan.idle_timeout,
    )


class _Replayable:
    """A request body kept whole so that a retry can send it again."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes):
        self._data = data

    async def iter_any(self):
        yield self._data


class BodyTooLarge(Exception):
    pass


class _LimitedBody:
    """A chunked request body that stops being read once it passes the limit."""

    def __init__(self, body, limit: int):
        self._body = body
        self._limit = limit

    async def iter_any(self):
        seen = 0
        async for chunk in self._body.iter_any():
            seen += len(chunk)
            if seen > self._limit:
                raise BodyTooLarge()
            yield chunk


async def _whole(upstream: UpstreamResponse, headers: CIMultiDict, exchange: Exchange) -> web.Response:
    try:
        body = await upstream.read()
    except BaseException as exc:  # noqa: BLE001
        raise _as_proxy_error(exc) from exc
    exchange.bytes_sent = len(body)
    return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)


async def _stream(
    request: web.BaseRequest,
    upstream: UpstreamResponse,
    headers: CIMultiDict,
    deadline: float | None,
    exchange: Exchange,
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    try:
        async with _deadline(deadline):
            async for chunk in upstream.content.iter_any():
                exchange.bytes_sent += len(chunk)
                await response.write(chunk)
    except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError, ConnectionError):
        # Headers are out; the only honest signal left is to cut the connection.
        upstream.close()
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


def _tls_arguments(plan: ForwardPlan) -> dict:
    if plan.scheme != "https":
        return {}
    return {"ssl": plan.verify_tls, "server_hostname": plan.server_hostname}


class _deadline:
    """`asyncio.timeout` that costs nothing when there is no deadline."""

    __slots__ = ("_cm",)

    def __init__(self, when: float | None):
        self._cm = asyncio.timeout_at(_loop_time(when)) if when is not None else None

    async def __aenter__(self):
        if self._cm is not None:
            await self._cm.__aenter__()

    async def __aexit__(self, *exc):
        if self._cm is not None:
            return await self._cm.__aexit__(*exc)
        return False


def _loop_time(deadline: float) -> float:
    """Convert a time.monotonic() deadline to the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - monotonic())


def _as_proxy_error(exc: BaseException) -> BaseException:
    if isinstance(exc, asyncio.CancelledError):
        return exc
    if isinstance(exc, ConnectFailed):
        exc = exc.cause
    if isinstance(exc, UnexpectedUpgrade):
        return Refusal(502, "bad_gateway", "The upstream switched protocols on a request that did not ask to.")
    if isinstance(exc, BodyTooLarge):
        return Refusal(413, "body_too_large", "The request body is too large.")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or isinstance(exc, aiohttp.ServerTimeoutError):
        return Refusal(504, "upstream_timeout", "The upstream did not answer in time.")
    if isinstance(exc, (aiohttp.ClientConnectorDNSError, socket.gaierror)):
        return Refusal(503, "no_endpoint", "The upstream's address could not be resolved.")
    if isinstance(exc, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
        return Refusal(502, "upstream_unreachable", "The upstream refused the connection.")
    if isinstance(exc, ssl.SSLError):
        return Refusal(502, "upstream_tls", "The TLS handshake with the upstream failed.")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)):
        return Refusal(502, "upstream_reset", "The upstream closed the connection.")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Refusal(502, "upstream_invalid", "The upstream sent an invalid response body.")
    if isinstance(exc, aiohttp.ClientResponseError):
        return Refusal(502, "upstream_invalid", "The upstream sent an invalid response.")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return Refusal(502, "upstream_error", "The upstream request failed.")
    return exc
