"""WebSocket text frames built once and written as they are to every recipient.

A server-to-client WebSocket frame is not masked (RFC 6455, section 5.1), and we negotiate no
extension (permessage-deflate is declined at the handshake), so the bytes of an event's frame are
the same for every subscriber: the thread actor builds them once per event (JSON, UTF-8, the
frame header) and every connection writes that same ``bytes`` object. Nothing is encoded per
connection.
"""

from __future__ import annotations

import struct

_OP_TEXT = 0x81  # FIN + text
_OP_PING = 0x89  # FIN + ping


class Frame:
    """One complete text frame (``data``: header + UTF-8 payload), shared by every recipient.

    ``committed_at`` (``trio.current_time()`` at commit) is set for events, for the delivery
    latency histogram. Immutable by convention; ``__slots__`` keeps a queued frame small.
    """

    __slots__ = ("committed_at", "data")

    def __init__(self, data: bytes, committed_at: float | None = None) -> None:
        self.data = data
        self.committed_at = committed_at

    def __len__(self) -> int:
        return len(self.data)

    def text(self) -> str:
        """The frame's payload as text (for transports that frame messages themselves, tests)."""
        return self.data[_header_length(self.data) :].decode()

    def __repr__(self) -> str:
        return f"Frame({self.text()!r})"


def _header(opcode: int, length: int) -> bytes:
    if length < 126:
        return struct.pack("!BB", opcode, length)
    if length < 65536:
        return struct.pack("!BBH", opcode, 126, length)
    return struct.pack("!BBQ", opcode, 127, length)


def _header_length(data: bytes) -> int:
    n = data[1] & 0x7F
    return 2 if n < 126 else 4 if n == 126 else 10


def text_frame(text: str, committed_at: float | None = None) -> Frame:
    """The unmasked, unfragmented text frame carrying ``text``."""
    payload = text.encode()
    return Frame(_header(_OP_TEXT, len(payload)) + payload, committed_at)


def ping_frame(payload: bytes) -> bytes:
    """An unmasked Ping frame (payload at most 125 bytes)."""
    if len(payload) > 125:
        raise ValueError("a control frame's payload is at most 125 bytes")
    return _header(_OP_PING, len(payload)) + payload
