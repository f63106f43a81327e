"""A small, explicit extension of hypercorn's WebSocket stream (checked against hypercorn 0.18).

Why: hypercorn (0.18) gives the ASGI app no way to
(1) see Pong frames (it drops them; its own ``websocket_ping_interval`` never times out), nor
(2) stop writing to a client that stopped reading: ``TCPServer.protocol_send`` runs
``send_all`` in a *shielded* cancel scope, so ``await websocket.send(...)`` -- and a close frame --
to a stalled client blocks forever and cannot be cancelled.

What: ``install()`` wraps four methods, once per process:

* ``TCPServer.__init__`` (run in the connection's task, which then runs ``TCPServer.run``) sets a
  context variable holding the ``TCPServer``; the ASGI app task is spawned from that task, so it
  inherits the variable; and it replaces the send lock with the send gate (see "Direct writes").
* ``WSStream._accept`` (the ASGI ``websocket.accept``, which runs in the app task) puts a
  ``WSControl`` into ``scope["extensions"]["threadline"]``; once the 101 is sent it lets go of
  the h11 connection that parsed the handshake (nothing after the upgrade uses it, and every
  open WebSocket would keep one, ~2 KiB).
* ``WSStream._handle_events`` (the reader, once per batch of received data) wraps the wsproto
  connection's ``events`` the first time, so every Pong is reported to ``WSControl.on_pong``
  (not in ``_accept``: the reader may handle the first frames while the 101 is being sent).
* ``WSStream._send_wsproto_event`` records the first close code the server sends.

``WSControl`` offers direct writes of prebuilt frames to the socket (below),
``send_frames(frames)`` (several frames in one write through hypercorn's own path, where direct
writes are not possible), ``ping(payload)`` (a real Ping frame through hypercorn's own path),
``abort()`` (closes the TCP socket: every blocked ``send_all`` wakes with
``ClosedResourceError``, which hypercorn turns into a disconnect) and ``server_close_code``
(1009 when hypercorn closed the stream itself for an oversized message, 1002/1007 for a protocol
violation). A protocol violation wsproto detects (reserved bits, bad opcodes, unmasked frames,
invalid UTF-8, invalid close codes...) is answered with a close frame carrying its code (1002 or
1007) before the TCP close; hypercorn alone would drop the stream without one. It also declines
permessage-deflate (a fan-out server would otherwise compress every frame once per client).

Direct writes (``WSControl.direct``: HTTP/1.1 over plain TCP). hypercorn writes every byte of a
connection in ``TCPServer.protocol_send`` under ``TCPServer.send_lock``, one ``send_all`` at a
time. ``TCPServer.run`` replaces that lock with a ``trio.Semaphore(1)`` (the same ``async with``
use, but it may be taken and given back by different tasks): the connection's *send gate*. The
connection actor writes a frame straight to the socket (``send_now``: a synchronous,
non-blocking ``socket.send``, no checkpoint) only while the gate is free, so it never
interleaves with a ``send_all`` hypercorn has under way; when the kernel takes only part of a
frame, the actor takes the gate at once (``hold``, still no checkpoint) and keeps it until the
frame is complete, so hypercorn's pongs and close frames queue behind it. Data frames are
written only while wsproto's state is OPEN (a close frame hypercorn is about to send moves it to
LOCAL_CLOSING first), so nothing follows a close frame. The frames are built by
``actors/frames.py``; with no extension negotiated, wsproto would produce the same bytes.
Over TLS or HTTP/2 the stream is not the socket, and ``direct`` is False.

Over HTTP/2 (RFC 8441 WebSockets) ``abort`` drops the whole TCP connection, every stream on it;
browsers open WebSockets over HTTP/1.1, and hypercorn serves those one per connection.

A different hypercorn version refuses to install (``RuntimeError`` at import of ``server.ws``)
rather than misbehave silently; re-verify the two methods and bump ``SUPPORTED``.
"""

from __future__ import annotations

import contextvars
import functools
import socket
import weakref
from collections.abc import Callable, Generator, Sequence
from importlib.metadata import version
from typing import Any

import trio
from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import Data
from hypercorn.protocol.h11 import H11Protocol, H11WSConnection
from hypercorn.trio import tcp_server
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event, Ping, Pong

from actors.connection import TransportClosed
from actors.frames import Frame

SUPPORTED = ("0.18.",)
EXTENSION_KEY = "threadline"
# Closes hypercorn/wsproto send on their own: protocol error, invalid data, message too big.
SERVER_CLOSE_CODES = frozenset({1002, 1007, 1009})

_tcp_server: contextvars.ContextVar[Any] = contextvars.ContextVar("threadline_tcp_server")
_installed = False


def _ignore_pong(payload: bytes) -> None:
    return None


def _ignore_ping() -> None:
    return None


def _ignore_close(code: int) -> None:
    return None


class WSControl:
    """What the app may do to its WebSocket beyond ASGI (see the module docstring)."""

    def __init__(self, stream: Any, tcp: Any) -> None:
        self._stream = stream
        self._tcp = tcp
        self.on_pong: Callable[[bytes], None] = lambda payload: None
        # Called for every Ping frame the client sends (hypercorn answers it with a Pong), so
        # the app can charge pings to its rate limiter: a ping flood is abuse like any other.
        self.on_ping: Callable[[], None] = lambda: None
        # Called when hypercorn itself closes the WebSocket (1009 oversize, 1002/1007 protocol
        # violation), so the app can end at once instead of waiting for a close reply that the
        # rest of an oversized frame may swallow.
        self.on_server_close: Callable[[int], None] = lambda code: None
        self.pongs = 0
        self.server_close_code: int | None = None
        self._gate: trio.Semaphore | None = None
        self._sock: socket.socket | None = None
        if tcp is not None and isinstance(getattr(tcp, "send_lock", None), trio.Semaphore):
            protocol = getattr(getattr(tcp, "protocol", None), "protocol", None)
            trio_sock = getattr(tcp.stream, "socket", None)  # a SocketStream: plain TCP
            raw = getattr(trio_sock, "_sock", None)
            if isinstance(protocol, H11Protocol) and isinstance(raw, socket.socket):
                self._gate = tcp.send_lock
                self._sock = raw
        self.direct = self._sock is not None

    def detach(self) -> None:
        """The app is done with this WebSocket: drop what ties it to the connection's objects.

        The stream, its scope and wsproto's connection point back at this control (and its
        callbacks at the app's connection): left in place they make one reference cycle of every
        closed connection, which only a full garbage collection frees. Idempotent.
        """
        self.on_pong = _ignore_pong
        self.on_ping = _ignore_ping
        self.on_server_close = _ignore_close
        stream = self._stream
        if getattr(stream, "_threadline", None) is self:
            stream._threadline = None
        extensions = getattr(stream, "scope", {}).get("extensions") or {}
        if extensions.get(EXTENSION_KEY) is self:
            del extensions[EXTENSION_KEY]

    # -- direct writes (see the module docstring) ----------------------------------------------

    def _open(self) -> bool:
        stream = self._stream
        return (
            stream.state is ws_stream.ASGIWebsocketState.CONNECTED
            and not stream.closed
            and stream.connection.state is ConnectionState.OPEN
        )

    def send_now(self, data: bytes) -> int:
        """Write now if the gate is free and the WebSocket open: bytes taken, or -1."""
        gate = self._gate
        assert gate is not None and self._sock is not None
        if gate.value == 0 or not self._open():
            return -1
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise TransportClosed(str(exc)) from None

    def hold(self) -> None:
        """Take the free gate without waiting."""
        assert self._gate is not None
        self._gate.acquire_nowait()

    async def acquire(self) -> None:
        """Wait for the gate."""
        assert self._gate is not None
        await self._gate.acquire()

    def release(self) -> None:
        """Give the gate back."""
        assert self._gate is not None
        self._gate.release()

    def can_start_frame(self) -> bool:
        """Whether data frames may still be written (wsproto OPEN, stream connected)."""
        return self._open()

    def send_some(self, chunks: Sequence[bytes | memoryview]) -> int:
        """With the gate held: one non-blocking ``sendmsg``; the bytes the kernel took."""
        assert self._sock is not None
        try:
            return self._sock.sendmsg(chunks)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise TransportClosed(str(exc)) from None

    async def wait_writable(self) -> None:
        """Wait until the socket can take more."""
        assert self._sock is not None
        try:
            await trio.lowlevel.wait_writable(self._sock)
        except (trio.ClosedResourceError, OSError, ValueError) as exc:
            raise TransportClosed(str(exc)) from None

    def abort_now(self) -> None:
        """Close the socket at once (synchronously); blocked readers and writers wake."""
        if self._tcp is not None:
            self._tcp.stream.socket.close()

    def _pong(self, payload: bytes) -> None:
        self.pongs += 1
        self.on_pong(payload)

    async def ping(self, payload: bytes) -> None:
        """Send a Ping frame. Blocks (uncancellably) while the client's socket is full."""
        await self._stream._send_wsproto_event(Ping(payload=payload))

    async def send_frames(self, frames: Sequence[Frame]) -> None:
        """Write prebuilt frames, in order, in one write through hypercorn's own send path
        (over HTTP/1.1 the bytes go to the stream as they are; where direct writes are not
        possible, such as TLS). Does nothing once the WebSocket is closing."""
        stream = self._stream
        if not self._open():
            return
        data = b"".join(frame.data for frame in frames)
        await stream.send(Data(stream_id=stream.stream_id, data=data))

    async def abort(self) -> None:
        """Close the TCP connection at once, without a close handshake."""
        if self._tcp is None:
            return
        stream = getattr(self._tcp.stream, "transport_stream", self._tcp.stream)  # TLS: the socket
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _observe(connection: Any, control: WSControl) -> None:
    """Wrap a wsproto connection's ``events`` (pongs and pings reported; protocol violations
    answered)."""
    # Weak references only: the wrapper is stored on the wsproto connection, and strong ones
    # (to it, or to the control, which leads back to it) would make every closed connection a
    # reference cycle.
    events = type(connection).events
    connection_ref = weakref.ref(connection)
    control_ref = weakref.ref(control)
    open_state = ConnectionState.OPEN

    def observed_events() -> Generator[Event, None, None]:
        connection = connection_ref()
        if connection is None:
            return
        for event in events(connection):
            control = control_ref()
            if control is None:
                yield event
                continue
            if isinstance(event, Pong):
                control._pong(bytes(event.payload))
            elif isinstance(event, Ping):
                control.on_ping()
            elif isinstance(event, CloseConnection) and connection.state is open_state:
                # wsproto found a protocol violation (its ParseFailed: 1002, or 1007 for invalid
                # UTF-8) and reports it as a close while still OPEN; hypercorn then drops the
                # TCP stream without a word. Marked as a close received, hypercorn answers it
                # like one: a close frame with that code, then the TCP close.
                connection._state = ConnectionState.REMOTE_CLOSING
            yield event

    connection.events = observed_events


def install() -> None:
    """Patch hypercorn once; refuse versions this code was not checked against."""
    global _installed
    if _installed:
        return
    installed = version("hypercorn")
    if not installed.startswith(SUPPORTED):
        raise RuntimeError(
            f"server/wsext.py was checked against hypercorn {SUPPORTED}, found {installed}"
        )

    original_init = tcp_server.TCPServer.__init__
    original_accept = ws_stream.WSStream._accept
    original_send_event = ws_stream.WSStream._send_wsproto_event
    original_handle_events = ws_stream.WSStream._handle_events

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # Not a wrapper of ``run``: that would be one more coroutine frame held by every open
        # connection. A weak reference: copies of this task's context outlive it (e.g. in
        # asyncio timer handles), and must not keep the whole connection alive.
        _tcp_server.set(weakref.ref(self))
        # The send gate: used exactly as the lock it replaces, and also by WSControl's direct
        # writes, which may take it in one task and give it back in another.
        self.send_lock = trio.Semaphore(1)

    @functools.wraps(original_accept)
    async def _accept(self: Any, message: Any) -> None:
        tcp_ref = _tcp_server.get(None)
        control = WSControl(self, tcp_ref() if tcp_ref is not None else None)
        self.scope.setdefault("extensions", {})[EXTENSION_KEY] = control
        self._threadline = control
        # No permessage-deflate: every event goes to many clients, and per-connection zlib
        # contexts would cost CPU per frame per client and ~100s of KiB of memory each.
        self.handshake.extensions = None
        await original_accept(self, message)
        protocol = getattr(self.send, "__self__", None)  # stream_send's H11Protocol
        connection = getattr(protocol, "connection", None)
        if isinstance(connection, H11WSConnection):
            # Upgraded: from now on every byte passes through as WebSocket data; only a
            # response (never sent after the 101) would need the h11 connection.
            connection.h11_connection = None  # type: ignore[assignment]

    @functools.wraps(original_handle_events)
    async def _handle_events(self: Any) -> None:
        # Wrapped here, not in _accept: the reader can process the client's first frames while
        # _accept is still sending the 101, before anything _accept does afterwards.
        control = getattr(self, "_threadline", None)
        if control is not None and not getattr(self, "_threadline_observed", False):
            self._threadline_observed = True
            _observe(self.connection, control)
        await original_handle_events(self)

    @functools.wraps(original_send_event)
    async def _send_wsproto_event(self: Any, event: Event) -> None:
        control = getattr(self, "_threadline", None)
        notify: int | None = None
        if isinstance(event, CloseConnection) and control is not None:
            if control.server_close_code is None:
                control.server_close_code = int(event.code)
                if control.server_close_code in SERVER_CLOSE_CODES:
                    notify = control.server_close_code
        await original_send_event(self, event)
        if notify is not None and control is not None:
            control.on_server_close(notify)

    tcp_server.TCPServer.__init__ = __init__  # type: ignore[method-assign]
    ws_stream.WSStream._accept = _accept  # type: ignore[method-assign]
    ws_stream.WSStream._send_wsproto_event = _send_wsproto_event  # type: ignore[method-assign]
    ws_stream.WSStream._handle_events = _handle_events  # type: ignore[method-assign]
    _installed = True
