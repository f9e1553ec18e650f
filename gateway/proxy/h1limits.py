"""What an upstream may make the gateway hold while it reads a response, counted as bytes arrive.

aiohttp's response parser bounds one line and the number of header lines, not their sum (256
lines of 64 KiB would be 16 MiB per response), and llhttp reads chunk-size lines, chunk
extensions and trailers of any length without complaint. An upstream (a sandbox pod is anyone's
code) must not be able to make the gateway hold or chew on more than a request head's worth of
bytes that are not body.

`ResponseLimits` is decided once per process; `ChunkedFraming` follows the framing of one
chunked body as plain state that takes bytes, so it is tested without sockets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp.http_exceptions import HttpProcessingError

# The blank line that ends a head; aiohttp's parser accepts a bare LF for CRLF.
HEAD_END = re.compile(rb"\n\r?\n")
_HEX = re.compile(rb"[0-9A-Fa-f]+")


@dataclass(frozen=True, slots=True)
class ResponseLimits:
    head_bytes: int = 64 * 1024  # status line and headers together (each 1xx head on its own)
    line_bytes: int = 16 * 1024  # one status, header, chunk-size or trailer line
    headers: int = 256  # header lines of one head; trailer lines of one body

    def parser_limits(self) -> dict:
        """aiohttp's own per-line and count limits, for its response parser."""
        return {"max_line_size": self.line_bytes, "max_field_size": self.line_bytes, "max_headers": self.headers}


class ResponseRefused(HttpProcessingError):
    """An upstream response refused while being read: its head or chunked framing went over the
    limits, or where its head ends is unclear."""

    code = 502


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedFraming:
    """Follows a chunked body (RFC 9112 §7.1) to bound what is not body: each chunk-size line
    (extensions included), the line end after each chunk and each trailer line to one line
    limit, the trailer section to the head limit and header count.

    `feed` returns None while the body goes on, or the offset just past its end; it raises
    ResponseRefused on a violation. Malformed framing that stays within the limits is left to
    aiohttp's parser to refuse."""

    __slots__ = ("_limits", "_state", "_line", "_line_bytes", "_left", "_trailers", "_trailer_bytes")

    def __init__(self, limits: ResponseLimits):
        self._limits = limits
        self._state = _SIZE
        self._line = bytearray()  # the chunk-size line so far (bounded by the line limit)
        self._line_bytes = 0  # bytes of the current non-body line so far
        self._left = 0  # bytes of chunk data still to come
        self._trailers = 0
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> int | None:
        pos, end = 0, len(data)
        while pos < end:
            if self._state == _DATA:
                take = min(self._left, end - pos)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
                continue
            newline = data.find(b"\n", pos)
            stop = end if newline < 0 else newline
            self._line_bytes += stop - pos
            if self._line_bytes > self._limits.line_bytes:
                raise ResponseRefused(message=f"A chunked framing line is over {self._limits.line_bytes} bytes.")
            if self._state == _SIZE:
                self._line += data[pos:stop]
            if newline < 0:
                return None
            pos = newline + 1
            if self._line_ended():
                return pos
        return None

    def _line_ended(self) -> bool:
        """A line of framing is complete; whether it was the blank line that ends the body."""
        length, self._line_bytes = self._line_bytes, 0
        if self._state == _SIZE:
            digits = _HEX.match(self._line)
            size = int(digits.group(), 16) if digits is not None else 0  # else the parser refuses it
            self._line.clear()
            self._state, self._left = (_DATA, size) if size else (_TRAILER, 0)
        elif self._state == _DATA_END:
            self._state = _SIZE
        else:  # a trailer line, or the blank one that ends the body
            if length <= 1:  # "" or "\r"
                return True
            self._trailers += 1
            self._trailer_bytes += length + 1
            limits = self._limits
            if self._trailers > limits.headers or self._trailer_bytes > limits.head_bytes:
                raise ResponseRefused(message=f"The trailers are over {limits.headers} lines or {limits.head_bytes} bytes.")
        return False
