"""The aiohttp internals Sandgate relies on, checked one by one so that an aiohttp upgrade fails
here, naming what changed, rather than as a silent loss of a limit at run time.

pyproject.toml pins aiohttp's minor version; when raising the pin, run this file first. Each
entry names where the gateway uses it.
"""

from __future__ import annotations

import asyncio
import collections
import inspect

import aiohttp
import pytest
from aiohttp import web
from aiohttp import web_protocol
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_parser import RawResponseMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD

from gateway.policy.model import ListenerLimits
from gateway.server.protocol import make_server

VERSION = f"aiohttp {aiohttp.__version__}"

# (attribute of a RequestHandler instance, type it must have (None: any), where it is used)
HANDLER_ATTRIBUTES = [
    ("_manager", web.Server, "protocol.py: the port's limits and connection counts"),
    ("_loop", asyncio.AbstractEventLoop, "protocol.py: timers"),
    ("_waiter", None, "protocol.py: idle (waiting for a request) vs busy; a queued refusal wakes it"),
    ("_keepalive_timeout", (int, float), "protocol.py: the idle timeout, set per port before connection_made"),
    ("_keepalive_handle", None, "protocol.py: the idle timer, disarmed while a head is read"),
    ("_upgraded", bool, "protocol.py: an upgraded stream is not a request head"),
    ("_payload_parser", None, "protocol.py: a WebSocket's frames are not a request head"),
    ("_request_count", int, "protocol.py: whether the parser yielded a request from a chunk"),
    ("_messages", collections.deque, "protocol.py: the parsed requests; a refusal is queued there"),
    ("_force_close", bool, "protocol.py: no more reading once closing"),
    ("_close", bool, "protocol.py: no more reading once closing"),
    ("_request_in_progress", bool, "protocol.py: a late pipelined head waits for the response in flight"),
]

HANDLER_METHODS = [
    ("data_received", ("data",), "protocol.py: counts the bytes of request heads before parsing"),
    ("_process_keepalive", (), "protocol.py: the idle timer does not cut a head being read"),
    ("handle_error", ("request", "status", "exc", "message"), "protocol.py: SPEC §3.3 error bodies"),
    ("_make_error_handler", ("err_info",), "aiohttp answers a queued _ErrInfo through handle_error"),
    ("force_close", (), "protocol.py"),
    ("close", (), "protocol.py"),
]


@pytest.fixture
async def handler():
    """A connection handler of the gateway's own server, as aiohttp creates it per connection."""

    async def answer(request):
        return web.Response()

    limits = ListenerLimits(header_bytes=65536, headers_timeout=30.0, idle_timeout=75.0)
    server = make_server(answer, lambda: limits, max_header_bytes=65536, max_header_line_bytes=16384)
    return server()


@pytest.mark.parametrize("name, kind, used", HANDLER_ATTRIBUTES, ids=[a[0] for a in HANDLER_ATTRIBUTES])
async def test_request_handler_attribute(handler, name, kind, used):
    assert hasattr(handler, name), f"{VERSION}: RequestHandler.{name} is gone ({used})"
    if kind is not None:
        value = getattr(handler, name)
        assert isinstance(value, kind), f"{VERSION}: RequestHandler.{name} is a {type(value).__name__} ({used})"


@pytest.mark.parametrize("name, params, used", HANDLER_METHODS, ids=[m[0] for m in HANDLER_METHODS])
def test_request_handler_method(name, params, used):
    method = getattr(web_protocol.RequestHandler, name, None)
    assert callable(method), f"{VERSION}: RequestHandler.{name}() is gone ({used})"
    found = list(inspect.signature(method).parameters)[1:]
    assert found[:len(params)] == list(params), f"{VERSION}: RequestHandler.{name}{tuple(found)} ({used})"


def test_request_handler_takes_the_parser_limits_and_idle_timeout():
    params = inspect.signature(web_protocol.RequestHandler.__init__).parameters
    for name in ("max_line_size", "max_field_size", "max_headers", "keepalive_timeout"):
        assert name in params, f"{VERSION}: RequestHandler(..., {name}=) is gone (protocol.make_server)"


async def test_the_request_parser_is_the_c_one_with_our_limits(handler):
    """The limits are the C parser's (`_http_parser.pyx`): one header line is name plus value."""
    parser = handler._parser
    assert type(parser).__module__ == "aiohttp._http_parser", f"{VERSION}: request parser is {type(parser)}"
    with pytest.raises(aiohttp.http_exceptions.LineTooLong):
        parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 16_400 + b"\r\n\r\n")


def test_err_info_takes_status_exc_message():
    params = list(inspect.signature(web_protocol._ErrInfo).parameters)
    assert params == ["status", "exc", "message"], f"{VERSION}: web_protocol._ErrInfo{tuple(params)} (protocol._refuse)"
    info = web_protocol._ErrInfo(status=431, exc=ValueError(), message="m")
    assert (info.status, info.message) == (431, "m")


def test_empty_payload_is_at_eof():
    assert EMPTY_PAYLOAD.is_eof(), f"{VERSION}: streams.EMPTY_PAYLOAD (protocol._refuse)"


async def test_parsed_messages_have_the_fields_used_and_replace(handler):
    """The C parser's own message type (not http_parser.RawRequestMessage) is what
    protocol._make_request edits with `_replace`."""
    messages, _, _ = handler._parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    message, payload = messages[0]
    assert payload.is_eof(), f"{VERSION}: a request without a body has no payload at EOF (protocol._parsed)"
    assert callable(getattr(message, "_replace", None)), f"{VERSION}: {type(message)}._replace is gone (protocol._make_request)"
    changed = message._replace(version=aiohttp.HttpVersion10, should_close=True)
    assert (changed.version, changed.should_close, changed.path) == (aiohttp.HttpVersion10, True, "/")
    missing = {name for name in ("code", "reason", "headers", "should_close") if not hasattr(RawResponseMessage, name)}
    assert not missing, f"{VERSION}: RawResponseMessage lost {missing} (h1client.UpstreamResponse)"


def test_base_request_is_built_as_the_request_factory_builds_it():
    params = list(inspect.signature(web.BaseRequest.__init__).parameters)[1:7]
    assert params == ["message", "payload", "protocol", "payload_writer", "task", "loop"], \
        f"{VERSION}: BaseRequest{tuple(params)} (protocol._make_request)"
    for name in ("keep_alive", "protocol"):  # a property or aiohttp's reify: a descriptor read per response
        descriptor = inspect.getattr_static(web.BaseRequest, name, None)
        assert hasattr(descriptor, "__get__"), f"{VERSION}: BaseRequest.{name} is gone (protocol._GatewayRequest)"


async def test_server_runner_and_site_expose_what_app_py_reads():
    async def answer(request):
        return web.Response()

    server = web.Server(answer)
    for name in ("_loop", "_kwargs"):
        assert hasattr(server, name), f"{VERSION}: web.Server.{name} is gone (protocol.GatewayServer.__call__)"
    assert isinstance(inspect.getattr_static(web.Server, "connections"), property), \
        f"{VERSION}: web.Server.connections is gone (connection limits, drain)"
    runner = web.ServerRunner(server)
    await runner.setup()
    try:
        assert runner.server is server, f"{VERSION}: ServerRunner.server is gone (app.drain)"
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server.sockets, f"{VERSION}: TCPSite._server.sockets is gone (app._bound_address)"
    finally:
        await runner.cleanup()


async def test_the_upstream_client_protocol_and_writer_take_what_h1client_passes():
    params = inspect.signature(ResponseHandler.set_response_params).parameters
    for name in ("skip_payload", "auto_decompress", "read_timeout", "max_line_size", "max_field_size", "max_headers"):
        assert name in params, f"{VERSION}: ResponseHandler.set_response_params({name}=) is gone (h1client)"
    protocol = ResponseHandler(asyncio.get_running_loop())
    for name in ("read", "is_connected", "close"):
        assert callable(getattr(protocol, name, None)), f"{VERSION}: ResponseHandler.{name}() is gone (h1client)"
    assert isinstance(protocol.should_close, bool), f"{VERSION}: ResponseHandler.should_close (h1client)"
    writer = StreamWriter(protocol, asyncio.get_running_loop())
    for name in ("enable_chunking", "write_headers", "write", "write_eof"):
        assert callable(getattr(writer, name, None)), f"{VERSION}: StreamWriter.{name}() is gone (h1client)"


async def test_a_client_websocket_reaches_its_transport_as_websocket_py_reads_it(aiohttp_server):
    """websocket.py `_transport_of`: the upstream socket's transport, for back-pressure and the
    forced cut of a peer that never answers a close."""

    async def echo(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/", echo)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.make_url("/")) as ws:
            response = getattr(ws, "_response", None)
            assert response is not None, f"{VERSION}: ClientWebSocketResponse._response is gone (websocket.py)"
            transport = getattr(response.connection, "transport", None)
            assert isinstance(transport, asyncio.Transport), \
                f"{VERSION}: ClientWebSocketResponse._response.connection.transport (websocket.py)"


async def test_the_upstream_client_protocol_internals_the_response_limits_rely_on():
    """h1client._BoundedResponseHandler counts bytes before ResponseHandler.data_received parses
    them and learns of each parsed head through DataQueue.feed_data."""
    protocol = ResponseHandler(asyncio.get_running_loop())
    for name, where in (("_payload", "the body being read"), ("_payload_parser", "a WebSocket's frames"),
                        ("_upgraded", "an upgraded stream"), ("_parser", "no parser yet: aiohttp keeps the bytes"),
                        ("_exception", "stop feeding after a failure"), ("_buffer", "the queue of parsed heads"),
                        ("_skip_payload", "a HEAD request's response has no body"), ("_loop", "the head timer")):
        assert hasattr(protocol, name), f"{VERSION}: ResponseHandler.{name} is gone (h1client: {where})"
    for name in ("data_received", "feed_data", "set_exception", "_on_read_timeout", "connection_lost"):
        assert callable(getattr(protocol, name, None)), f"{VERSION}: ResponseHandler.{name}() is gone (h1client)"
    source = inspect.getsource(ResponseHandler.data_received)
    assert "self.feed_data((message, " in source, \
        f"{VERSION}: ResponseHandler.data_received no longer queues heads through feed_data (h1client)"
    assert callable(getattr(EMPTY_PAYLOAD, "exception", None)) and callable(getattr(EMPTY_PAYLOAD, "on_eof", None)), \
        f"{VERSION}: StreamReader.exception()/on_eof() are gone (h1client)"
