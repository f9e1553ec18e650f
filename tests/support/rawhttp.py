"""HTTP/1.1 written and read byte by byte on raw sockets, for what an HTTP client library hides
(malformed requests, pipelining, interim responses, exact response headers, one kept connection)."""

from __future__ import annotations

import asyncio
import json
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass

TIMEOUT = 5.0  # bound on one exchange; a healthy run needs milliseconds


@dataclass
class RawResponse:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ",".join(values) if values else None

    def json(self) -> dict:
        return json.loads(self.body)


def request(*lines: str, body: bytes = b"") -> bytes:
    """Request head from its lines (request line first); CRLFs and the blank line are added."""
    return "".join(line + "\r\n" for line in lines).encode("latin-1") + b"\r\n" + body


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse:
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    response = RawResponse(version, int(status), headers, b"")
    if head or response.status < 200 or response.status in (204, 304):
        return response
    if "chunked" in (response.header("Transfer-Encoding") or "").lower():
        response.body = await read_chunked(reader)
    elif response.header("Content-Length") is not None:
        response.body = await reader.readexactly(int(response.header("Content-Length")))
    else:
        response.body = await reader.read()
    return response


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
        pass
    return bytes(body)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection within `seconds`; what it still sends is read
    and dropped (a close with bytes of ours still unread arrives as a reset)."""
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except asyncio.TimeoutError:
        return False


@asynccontextmanager
async def raw_connection(gw, timeout: float = TIMEOUT):
    """(reader, writer) on the gateway's first listener; everything inside is bounded by `timeout`."""
    host, port = next(iter(gw.addresses.values()))
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(timeout):
            yield reader, writer
    finally:
        writer.close()


async def send(gw, raw: bytes, *, responses: int = 1, timeout: float = TIMEOUT) -> list[RawResponse]:
    """Write `raw` on a fresh connection and read `responses` answers."""
    async with raw_connection(gw, timeout) as (reader, writer):
        writer.write(raw)
        await writer.drain()
        return [await read_response(reader) for _ in range(responses)]


class KeptConnection:
    """One HTTP/1.1 connection (TLS when given a context), used for several requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, address: tuple[str, int], host: str, tls: ssl.SSLContext | None = None) -> "KeptConnection":
        """`host` is sent as Host and, with `tls`, as the server name (SNI) the certificate is checked for."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address[0], address[1], ssl=tls, server_hostname=host if tls else None), TIMEOUT
        )
        return cls(reader, writer, host)

    def peer_certificate(self) -> bytes:
        return self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)

    async def get(self, path: str = "/") -> RawResponse:
        self.writer.write(request(f"GET {path} HTTP/1.1", f"Host: {self.host}"))
        await self.writer.drain()
        return await asyncio.wait_for(read_response(self.reader), TIMEOUT)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
