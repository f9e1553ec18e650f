"""The channel.k8s.io WebSocket subprotocols: one stream per channel, the channel in a leading byte.

v4 carries a metav1.Status on the error channel; v5 adds a close frame [255, channel];
the two old ones carry plain text errors, base64.channel.k8s.io in text frames.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE = 255  # v5: [255, channel] half-closes a stream


@dataclass(frozen=True)
class ChannelProtocol:
    name: str
    in_base64: bool = False  # text frames: the channel as an ASCII digit, the data base64-encoded
    status_errors: bool = True  # the error channel carries a metav1.Status, not plain text
    close_frames: bool = False

    def encode(self, channel: int, data: bytes) -> bytes | str:
        if self.in_base64:
            return str(channel) + base64.b64encode(data).decode()
        return bytes([channel]) + data

    def decode(self, message: bytes | str) -> tuple[int, bytes] | None:
        """(channel, data), or None for a frame that carries nothing."""
        if not message:
            return None
        if self.in_base64:
            text = message if isinstance(message, str) else message.decode()
            try:
                return int(text[0]), base64.b64decode(text[1:])
            except (ValueError, binascii.Error):
                return None
        data = message.encode() if isinstance(message, str) else message
        return data[0], data[1:]


# Best first: the server takes the first of these the client offers.
PROTOCOLS = (
    ChannelProtocol("v5.channel.k8s.io", close_frames=True),
    ChannelProtocol("v4.channel.k8s.io"),
    ChannelProtocol("base64.channel.k8s.io", in_base64=True, status_errors=False),
    ChannelProtocol("channel.k8s.io", status_errors=False),
)


def choose(offered: str) -> ChannelProtocol | None:
    names = {name.strip() for name in offered.split(",")}
    return next((protocol for protocol in PROTOCOLS if protocol.name in names), None)
