"""The connection actor: one per WebSocket, owning its reader, dispatcher, writer and heartbeat.

It knows nothing of HTTP frameworks: the transport (``server/ws.py``) hands it a ``Transport``,
and the op layer (``server/wsops.py``) an ``OpHandler``.

Nursery: ``run`` owns the connection's nursery; inside it a *work* scope holds the reader, the
dispatcher, the writer and the heartbeat. Closing cancels the work scope, sends the close frame
from its own task with a deadline (``close_timeout_s``) and aborts the TCP stream if the deadline
passes (a client that stopped reading cannot hold the close up, nor anything else).

Queues and their overflow actions:

* outbound: ``trio.open_memory_channel(settings.ws_outbound_queue)`` (default 256 frames), filled
  with ``send_nowait`` by thread actors and by the op replies. Full -> the client is a slow
  consumer: close 4002 ``slow_consumer``. Only the writer awaits the client.
* inbound: ``trio.open_memory_channel(settings.ws_inbound_queue)`` (default 64 frames) between the
  reader and the dispatcher. Full -> the reader waits, so TCP back-pressure slows the client
  down; ops are still rate limited (and refused with ``rate_limited``) as they are read.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import trio

from actors.thread import DropReason
from server import metrics

log = structlog.get_logger(__name__)

# Close codes of the contract and the disconnect reason each is counted under.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # server shutdown
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_SLOW_CONSUMER = 4002
CLOSE_HEARTBEAT_TIMEOUT = 4003
CLOSE_RATE_LIMITED = 4029
CLOSE_TOKEN_EXPIRED = 4001  # not in the contract: the credential the socket opened with expired

# A writer sends what has queued up in one write: at most this many frames / characters.
_BATCH_FRAMES = 64
_BATCH_CHARS = 256 * 1024

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
# Closes the WebSocket server sends by itself (the transport reports them), by reason label.
_SERVER_CLOSES = {
    CLOSE_PROTOCOL_ERROR: "protocol_error",
    CLOSE_INVALID_DATA: "invalid_data",
    CLOSE_TOO_BIG: "too_large",
}

_DROP_CLOSE = {
    "slow_consumer": (CLOSE_SLOW_CONSUMER, "slow_consumer"),
    "error": (CLOSE_INTERNAL, "error"),
    "shutdown": (CLOSE_GOING_AWAY, "shutdown"),
}


class TransportClosed(Exception):
    """The peer is gone; raised by ``Transport.receive``/``send``."""


class Transport(Protocol):
    """One WebSocket as the connection actor needs it."""

    async def receive(self) -> str | bytes:
        """The next message; raises ``TransportClosed`` when the peer has gone."""

    async def send(self, texts: Sequence[str]) -> None:
        """Write these text frames, in order (in one write when it can). May block while the
        client is not reading."""

    async def ping(self, payload: bytes) -> None:
        """Send a Ping frame. May block while the client is not reading."""

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame. May block while the client is not reading."""

    async def abort(self) -> None:
        """Drop the TCP stream now; wakes every blocked send with an error."""

    def server_close_code(self) -> int | None:
        """A close the WebSocket server sent by itself (1009 for an oversized frame), if any."""


class OpHandler(Protocol):
    """The op layer: admits frames as they are read, then handles them one by one."""

    def admit(self, conn: Connection, raw: str | bytes) -> Any | None:
        """Parse and rate-limit a frame; None if it was refused (and answered) already."""

    async def handle(self, conn: Connection, item: Any) -> None:
        """Execute one admitted op and queue exactly one reply."""


@dataclass(frozen=True, slots=True)
class OutFrame:
    """A frame queued for the writer; ``committed_at`` is set for events (delivery latency)."""

    text: str
    committed_at: float | None = None


class Heartbeat:
    """Ping every ``interval_s``; no pong within ``timeout_s`` -> ``on_timeout()``.

    Any pong received after a ping was sent counts. The ping itself is sent from its own task in
    ``nursery``, since writing to a client that stopped reading may block until the stream is
    aborted; the timeout runs regardless.
    """

    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._pong = trio.Event()
        self._counter = itertools.count(1)
        self.pings = 0
        self.pongs = 0

    def pong(self, payload: bytes = b"") -> None:
        """Called by the transport for every Pong frame it receives (never blocks)."""
        self.pongs += 1
        self._pong.set()

    async def run(
        self,
        ping: Callable[[bytes], Awaitable[None]],
        on_timeout: Callable[[], None],
        nursery: trio.Nursery,
    ) -> None:
        """Loop until a timeout (then call ``on_timeout`` and return) or cancellation."""
        while True:
            await trio.sleep(self.interval_s)
            self._pong = trio.Event()
            payload = str(next(self._counter)).encode()
            self.pings += 1
            nursery.start_soon(ping, payload)
            with trio.move_on_after(self.timeout_s):
                await self._pong.wait()
            if not self._pong.is_set():
                on_timeout()
                return


class Connection:
    """A WebSocket client: its queues, subscriptions, close state and tasks.

    Implements ``actors.thread.Subscriber`` so thread actors can deliver to it directly.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        transport: Transport,
        handler: OpHandler,
        heartbeat: Heartbeat,
        *,
        outbound_size: int,
        inbound_size: int,
        close_timeout_s: float = 2.0,
        expires_in_s: float | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.transport = transport
        self.handler = handler
        self.heartbeat = heartbeat
        self.close_timeout_s = close_timeout_s
        self.expires_in_s = expires_in_s
        self._out_send, self._out_recv = trio.open_memory_channel[OutFrame](outbound_size)
        self._in_send, self._in_recv = trio.open_memory_channel[Any](inbound_size)
        self.subscriptions: set[str] = set()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._close_requested = trio.Event()
        self.closed = trio.Event()
        self.strikes = 0  # consecutive rate-limit refusals (the op layer counts them)

    def __hash__(self) -> int:
        return self.id

    def __eq__(self, other: object) -> bool:
        return self is other

    # -- Subscriber ------------------------------------------------------------------------------

    def offer(self, frame: str, committed_at: float | None) -> bool:
        """Queue an event frame without waiting; False (and close 4002) if the queue is full."""
        if self.close_code is not None:
            return True  # closing: nothing more goes out, but this is not the sender's fault
        try:
            self._out_send.send_nowait(OutFrame(frame, committed_at))
        except trio.WouldBlock:
            self.close(CLOSE_SLOW_CONSUMER, "slow_consumer")
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        metrics.WS_OUTBOUND_QUEUE_DEPTH.observe(self._out_recv.statistics().current_buffer_used)
        return True

    async def put(self, frame: str) -> None:
        """Queue a frame, waiting for room (replays, from this connection's own task)."""
        await self._out_send.send(OutFrame(frame))

    def dropped(self, thread_id: str, reason: DropReason) -> None:
        """A thread actor removed us; the connection cannot go on without that thread's events."""
        self.subscriptions.discard(thread_id)
        code, label = _DROP_CLOSE[reason]
        self.close(code, label)

    # -- replies -----------------------------------------------------------------------------------

    def send_frame(self, text: str) -> None:
        """Queue a reply frame; a full queue closes the connection 4002 (never waits)."""
        if not self.offer(text, None):
            log.info("ws.reply_dropped")

    # -- closing -----------------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to close with ``code`` (idempotent, never blocks)."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self._close_requested.set()

    def server_closed(self, code: int) -> None:
        """The WebSocket server closed the socket itself (1002, 1007, 1009): end, sending nothing.

        Called by the transport (never blocks). Other codes are ignored.
        """
        if code in _SERVER_CLOSES:
            self.close(code, _SERVER_CLOSES[code])

    def _peer_gone(self) -> None:
        """Record why the peer went away, unless a close was already decided."""
        if self.close_code is not None:
            return
        server_code = self.transport.server_close_code()
        if server_code in _SERVER_CLOSES:
            self.close_code, self.close_reason = server_code, _SERVER_CLOSES[server_code]
        else:
            self.close_code, self.close_reason = CLOSE_NORMAL, "client"

    # -- the actor -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until closed by either side. Cancelling it (peer gone) is a normal end."""
        metrics.WS_CONNECTIONS.inc()
        structlog.contextvars.bind_contextvars(connection_id=self.id)
        try:
            async with trio.open_nursery() as nursery:
                work = trio.CancelScope()
                nursery.start_soon(self._work, work, nursery)
                await self._close_requested.wait()
                work.cancel()
                if self.close_reason not in ("client", *_SERVER_CLOSES.values()):
                    await self._send_close(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._peer_gone()
            metrics.WS_CONNECTIONS.dec()
            metrics.WS_DISCONNECTS.labels(reason=self.close_reason).inc()
            log.info("ws.closed", code=self.close_code, reason=self.close_reason)
            self._out_recv.close()
            self._in_recv.close()
            self.closed.set()

    async def _send_close(self, nursery: trio.Nursery) -> None:
        assert self.close_code is not None and self.close_reason is not None
        sent = trio.Event()

        async def _close_frame(code: int, reason: str) -> None:
            try:
                await self.transport.close(code, reason)
            except TransportClosed:
                pass
            sent.set()

        nursery.start_soon(_close_frame, self.close_code, self.close_reason)
        with trio.move_on_after(self.close_timeout_s):
            await sent.wait()
        if not sent.is_set():
            log.info("ws.aborted", code=self.close_code)
            await self.transport.abort()

    async def _work(self, scope: trio.CancelScope, outer: trio.Nursery) -> None:
        with scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._dispatcher)
                    nursery.start_soon(self._writer)
                    if self.expires_in_s is not None:
                        nursery.start_soon(self._expire, self.expires_in_s)
                    nursery.start_soon(
                        self.heartbeat.run,
                        self.transport.ping,
                        lambda: self.close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat_timeout"),
                        outer,  # a blocked ping must not hold the work scope open
                    )
            except* TransportClosed:
                self._peer_gone()
                self._close_requested.set()

    async def _expire(self, after_s: float) -> None:
        """A socket lives no longer than the credential it was opened with."""
        await trio.sleep(max(0.0, after_s))
        self.close(CLOSE_TOKEN_EXPIRED, "token_expired")

    async def _reader(self) -> None:
        while True:
            raw = await self.transport.receive()
            metrics.WS_FRAMES.labels(direction="in").inc()
            item = self.handler.admit(self, raw)
            if item is not None:
                await self._in_send.send(item)

    async def _dispatcher(self) -> None:
        async for item in self._in_recv:
            await self.handler.handle(self, item)

    async def _writer(self) -> None:
        """Drain the outbound queue; frames already waiting go out together in one write."""
        out = metrics.WS_FRAMES.labels(direction="out")
        async for first in self._out_recv:
            batch = [first]
            size = len(first.text)
            while len(batch) < _BATCH_FRAMES and size < _BATCH_CHARS:
                try:
                    frame = self._out_recv.receive_nowait()
                except trio.WouldBlock:
                    break
                batch.append(frame)
                size += len(frame.text)
            await self.transport.send([frame.text for frame in batch])
            out.inc(len(batch))
            now = trio.current_time()
            for frame in batch:
                if frame.committed_at is not None:
                    metrics.EVENT_DELIVERY.observe(now - frame.committed_at)
