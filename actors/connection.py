"""The connection actor: one per WebSocket, owning its reader, dispatcher, heartbeat and writes.

It knows nothing of HTTP frameworks: the transport (``server/ws.py``) hands it a ``Transport``,
and the op layer (``server/wsops.py``) an ``OpHandler``.

Nursery: ``run`` owns the connection's nursery and runs the reader itself, in the caller's task
(an idle connection costs no task of its own), inside a *work* scope; the dispatcher has a work
scope too. Heartbeats and token expiry are entries in the process-wide ``Timers``. Closing
cancels the work scopes, lets the frames already queued go out, then sends the close frame, all
within ``close_timeout_s``; past that the TCP stream is aborted (a client that stopped reading
cannot hold the close up, nor anything else).

Writing (the hot path of fan-out). Frames arrive as ``Frame`` objects whose bytes are the
complete WebSocket frame, built once per event by the thread actor and shared by every
subscriber. ``offer`` writes them straight to the socket, synchronously, when nothing is queued
and no other write holds the socket (``DirectSocket.send_now``): no task wakes up per frame. Only
when the kernel does not take a whole frame does the rest wait in the outbound queue, with the
socket held (so no other frame, ping or close can interleave), and a writer task is started
that waits for the socket to be writable and writes everything queued with one ``sendmsg``; it
ends when the queue is empty. A transport that cannot write directly (TLS, HTTP/2, tests) gets
whole frames through ``Transport.send`` from the same writer task.

Queues and their overflow actions:

* outbound: a deque (created when a frame has to wait, dropped when empty) bounded twice, by
  ``outbound_size`` frames (default 256) and by ``outbound_bytes`` (default 1 MiB), counting the
  bytes queued plus the bytes of a frame the kernel has not yet accepted; filled without
  waiting by thread actors and the op replies. A frame that would take it over either bound
  closes the connection 4002 ``slow_consumer`` (a frame into an empty queue is always taken, so
  one frame larger than the byte bound does not close a client that keeps up). A stalled client
  thus never pins much more than ``outbound_bytes`` of server memory. Replay (``put``) waits
  for room instead.
* inbound: a deque (likewise) of up to ``settings.ws_inbound_queue`` (default 64) admitted ops
  between the reader and the dispatcher (a task started when ops arrive, ended when none is
  left, so an idle connection has none). Full -> the reader waits, so TCP back-pressure slows
  the client down; ops are still rate limited (and refused with ``rate_limited``) as they are
  read.

Metrics are counted off the per-frame path: frames out are counted by the thread actor once per
event, the queue depth is sampled when an op reply is queued and when the writer task starts.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
import trio

from actors.frames import Frame, ping_frame, text_frame
from actors.thread import DropReason
from actors.timers import Timer, Timers
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

# The writer hands at most this many queued frames to one sendmsg (IOV_MAX is 1024).
_BATCH_FRAMES = 64

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
    """The peer is gone; raised by ``Transport`` methods."""


class DirectSocket(Protocol):
    """The socket under a WebSocket, for writing prebuilt frames to it directly.

    The socket has one send gate, shared with the WebSocket server's own writes (pongs, its
    close frames); whoever writes part of a frame keeps the gate until the frame is complete.
    """

    def send_now(self, data: bytes) -> int:
        """Write ``data`` now if the gate is free and the WebSocket open, without waiting.

        Returns the number of bytes the kernel took (0 to ``len(data)``), or -1 when nothing
        may be written now. Never checkpoints. Raises ``TransportClosed``.
        """

    def hold(self) -> None:
        """Take the (free) gate without waiting: right after a partial ``send_now``."""

    async def acquire(self) -> None:
        """Wait for the gate."""

    def release(self) -> None:
        """Give the gate back."""

    def can_start_frame(self) -> bool:
        """Whether the WebSocket is still open for data frames."""

    def send_some(self, chunks: Sequence[bytes | memoryview]) -> int:
        """With the gate held: write what the kernel takes now; the number of bytes."""

    async def wait_writable(self) -> None:
        """Wait until the socket can take more (raises ``TransportClosed``)."""

    def abort_now(self) -> None:
        """Drop the TCP stream at once (a frame was left half written)."""


class Transport(Protocol):
    """One WebSocket as the connection actor needs it.

    ``direct`` is the socket itself (a ``DirectSocket``) when the actor may write frames to it
    (HTTP/1.1 over plain TCP), else None and frames go through ``send``.
    """

    @property
    def direct(self) -> DirectSocket | None:
        """The socket, when frames may be written to it directly."""

    async def receive(self) -> str | bytes:
        """The next message; raises ``TransportClosed`` when the peer has gone."""

    async def send(self, frames: Sequence[Frame]) -> None:
        """Write whole frames, in order, through the server's own path (when not ``direct``).
        May block while the client is not reading."""

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


def _no_ping(payload: bytes) -> None:
    return None


def _no_timeout() -> None:
    return None


class Heartbeat:
    """Ping every ``interval_s``; no pong within ``timeout_s`` -> ``on_timeout()``.

    Driven by a process-wide ``Timers`` (no task per connection): ``start`` schedules the first
    ping; each ping schedules its timeout check; a pong after a ping schedules the next ping
    ``interval_s`` later. Any pong received after a ping was sent counts. ``send_ping`` must not
    block (the connection writes the Ping frame like any other frame, or hands it to a task).
    """

    __slots__ = (
        "_on_timeout",
        "_send_ping",
        "_timer",
        "_timers",
        "_waiting",
        "interval_s",
        "pings",
        "pongs",
        "timeout_s",
    )

    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._waiting = False  # a ping is out and no pong has come since
        self._timer: Timer | None = None
        self._timers: Timers | None = None
        self._send_ping: Callable[[bytes], None] = lambda payload: None
        self._on_timeout: Callable[[], None] = lambda: None
        self.pings = 0
        self.pongs = 0

    def start(
        self, timers: Timers, send_ping: Callable[[bytes], None], on_timeout: Callable[[], None]
    ) -> None:
        """Begin: the first ping goes out ``interval_s`` from now."""
        self._timers = timers
        self._send_ping = send_ping
        self._on_timeout = on_timeout
        self._timer = timers.call_later(self.interval_s, self._ping)

    def stop(self) -> None:
        """No more pings nor timeouts (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timers = None
        # They are the connection's methods: kept, they would make the two a reference cycle,
        # freed only by a full garbage collection.
        self._send_ping = _no_ping
        self._on_timeout = _no_timeout

    def pong(self, payload: bytes = b"") -> None:
        """Called by the transport for every Pong frame it receives (never blocks)."""
        self.pongs += 1
        if self._waiting and self._timers is not None:
            self._waiting = False
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._timers.call_later(self.interval_s, self._ping)

    def _ping(self) -> None:
        if self._timers is None:
            return
        self._waiting = True
        self.pings += 1
        self._timer = self._timers.call_later(self.timeout_s, self._check)
        self._send_ping(str(self.pings).encode())

    def _check(self) -> None:
        if self._waiting and self._timers is not None:
            self._timers = None
            self._on_timeout()


class Connection:
    """A WebSocket client: its queues, subscriptions, close state and tasks.

    Implements ``actors.thread.Subscriber`` so thread actors can deliver to it directly.
    """

    _ids = itertools.count(1)
    # Slots, and queues created only when something waits in them: an idle connection is mostly
    # this object, and a process holds tens of thousands of them.
    __slots__ = (
        "__weakref__",
        "_direct",
        "_dispatching",
        "_holding",
        "_inbox",
        "_inbox_room",
        "_nursery",
        "_offset",
        "_queue",
        "_room",
        "_send_now",
        "_timers",
        "_work_scopes",
        "_writing",
        "_written",
        "close_code",
        "close_reason",
        "close_timeout_s",
        "closed",
        "expires_in_s",
        "handler",
        "heartbeat",
        "id",
        "inbound_size",
        "outbound_bytes",
        "outbound_size",
        "queued_bytes",
        "strikes",
        "subscriptions",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        handler: OpHandler,
        heartbeat: Heartbeat,
        *,
        outbound_size: int,
        inbound_size: int,
        outbound_bytes: int = 1 << 20,
        close_timeout_s: float = 2.0,
        expires_in_s: float | None = None,
        timers: Timers | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.transport = transport
        self.handler = handler
        self.heartbeat = heartbeat
        self.close_timeout_s = close_timeout_s
        self.expires_in_s = expires_in_s
        self.outbound_size = outbound_size
        self.outbound_bytes = outbound_bytes
        # The outbound queue (None while empty): frames not yet (wholly) written; the first may
        # be partly written (``_offset`` bytes of it are in the kernel already).
        # ``queued_bytes`` counts the rest.
        self._queue: collections.deque[Frame] | None = None
        self._offset = 0
        self.queued_bytes = 0
        self._holding = False  # we hold the transport's send gate (a frame is half written)
        self._writing = False  # the writer task is running
        self._written: trio.Event | None = None  # set when the writer task ends
        self._room: trio.Event | None = None  # a replay waiting for room in the queue
        self._direct = transport.direct
        self._send_now = self._direct.send_now if self._direct is not None else None
        self._nursery: trio.Nursery | None = None
        # Admitted ops waiting for the dispatcher, which runs only while there are some.
        self.inbound_size = inbound_size
        self._inbox: collections.deque[Any] | None = None  # None while empty
        self._inbox_room: trio.Event | None = None
        self._dispatching = False
        self.subscriptions: set[str] = set()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = trio.Event()
        self.strikes = 0  # consecutive rate-limit refusals (the op layer counts them)
        # The process's timers (heartbeat, expiry); None: this connection runs its own.
        self._timers = timers
        self._work_scopes: list[trio.CancelScope] = []

    def __hash__(self) -> int:
        return self.id

    def __eq__(self, other: object) -> bool:
        return self is other

    # -- Subscriber ------------------------------------------------------------------------------

    def offer(self, frame: Frame) -> bool:
        """Write or queue ``frame`` without waiting; False (and close 4002) when over a bound.

        Never checkpoints: called from thread actors inside their loop over subscribers.
        """
        if self.close_code is not None:
            return True  # closing: nothing more goes out, but this is not the sender's fault
        return self._push(frame, bounded=True)

    def _push(self, frame: Frame, *, bounded: bool) -> bool:
        queue = self._queue
        if queue or self._writing:  # frames are waiting: this one waits behind them, if it fits
            if bounded and (
                (queue is not None and len(queue) >= self.outbound_size)
                or self.queued_bytes + len(frame.data) > self.outbound_bytes
            ):
                self.close(CLOSE_SLOW_CONSUMER, "slow_consumer")
                return False
        else:
            send_now = self._send_now
            if send_now is not None and self._nursery is not None:
                data = frame.data
                try:
                    written = send_now(data)
                except TransportClosed:
                    self._peer_gone()
                    return True
                if written == len(data):
                    return True
                if written >= 0:  # partly written: keep the socket until the rest is out
                    direct = self._direct
                    assert direct is not None
                    direct.hold()
                    self._holding = True
                    self._offset = written
                    self.queued_bytes = len(data) - written
                    self._queue = collections.deque((frame,))
                    self._start_writer()
                    return True
        if queue is None:
            queue = self._queue = collections.deque()
        queue.append(frame)
        self.queued_bytes += len(frame.data)
        self._start_writer()
        return True

    async def put(self, frame: Frame) -> None:
        """Queue a frame, waiting for room (replays, from this connection's own task)."""
        while self._queue and (
            len(self._queue) >= self.outbound_size
            or self.queued_bytes + len(frame.data) > self.outbound_bytes
        ):
            if self.close_code is not None:
                return
            self._room = room = trio.Event()
            await room.wait()
        self.offer(frame)

    def dropped(self, thread_id: str, reason: DropReason) -> None:
        """A thread actor removed us; the connection cannot go on without that thread's events."""
        self.subscriptions.discard(thread_id)
        code, label = _DROP_CLOSE[reason]
        self.close(code, label)

    # -- replies -----------------------------------------------------------------------------------

    def send_frame(self, text: str) -> None:
        """Queue a reply frame; a full queue closes the connection 4002 (never waits)."""
        # Replies are few next to events: a fair place to sample the queue's depth.
        metrics.WS_OUTBOUND_QUEUE_DEPTH.observe(len(self._queue or ()))
        if not self.offer(text_frame(text)):
            log.info("ws.reply_dropped")
        else:
            metrics.WS_FRAMES_OUT.inc()

    # -- writing -----------------------------------------------------------------------------------

    def _start_writer(self) -> None:
        if self._writing or self._nursery is None:
            return
        self._writing = True
        self._written = trio.Event()
        metrics.WS_OUTBOUND_QUEUE_DEPTH.observe(len(self._queue or ()))
        try:
            self._nursery.start_soon(self._write_direct if self._send_now else self._write_frames)
        except RuntimeError:
            # The connection's nursery is closing (the client is going away) while a thread
            # actor offers it a frame: nothing will be written; that must not fail the actor
            # (seen in the soak: thread actors crashed with "Nursery is closed").
            self._nursery = None
            self._writer_done()

    def _writer_done(self) -> None:
        self._writing = False
        if not self._queue:
            self._queue = None  # an idle connection keeps no queue
        if self._written is not None:
            self._written.set()
            self._written = None

    def _consume(self, written: int) -> None:
        """``written`` bytes of the queue's head frames went to the kernel."""
        self.queued_bytes -= written
        queue = self._queue
        assert queue is not None
        offset = self._offset + written
        while queue and offset >= len(queue[0].data):
            offset -= len(queue.popleft().data)
        self._offset = offset
        if self._room is not None:
            self._room.set()
            self._room = None

    def _discard(self) -> None:
        if self._queue is not None:
            self._queue.clear()
        self._offset = 0
        self.queued_bytes = 0
        if self._room is not None:
            self._room.set()
            self._room = None

    async def _write_direct(self) -> None:
        """Write the queue out as the socket takes it; the socket's gate is held meanwhile."""
        transport = self._direct
        queue = self._queue
        assert queue is not None and transport is not None
        try:
            if not self._holding:
                await transport.acquire()
                self._holding = True
            while queue:
                if not transport.can_start_frame():
                    # The WebSocket is closing (a close frame waits for the gate): finish the
                    # frame on the wire, if any, and drop the rest.
                    if not self._offset:
                        self._discard()
                        break
                    head = queue[0]
                    self._queue = queue = collections.deque([head])
                    self.queued_bytes = len(head.data) - self._offset
                chunks: list[bytes | memoryview] = [memoryview(queue[0].data)[self._offset :]]
                chunks += [f.data for f in itertools.islice(queue, 1, _BATCH_FRAMES)]
                self._consume(transport.send_some(chunks))
                if queue:
                    await transport.wait_writable()
        except TransportClosed:
            self._discard()
            self._peer_gone()
        finally:
            if self._holding:
                self._holding = False
                if self._offset:  # cancelled with a frame half written: the stream is unusable
                    self._discard()
                    transport.abort_now()
                transport.release()
            self._writer_done()

    async def _write_frames(self) -> None:
        """Write the queue out through ``Transport.send`` (transports that are not direct)."""
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), _BATCH_FRAMES))]
                try:
                    await self.transport.send(batch)
                finally:  # counted until the transport has taken them
                    self.queued_bytes -= sum(len(f.data) for f in batch)
                    if self._room is not None:
                        self._room.set()
                        self._room = None
        except TransportClosed:
            self._discard()
            self._peer_gone()
        finally:
            self._writer_done()

    # -- closing -----------------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to close with ``code`` (idempotent, never blocks)."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self._stop_work()

    def server_closed(self, code: int) -> None:
        """The WebSocket server closed the socket itself (1002, 1007, 1009): end, sending nothing.

        Called by the transport (never blocks). Other codes are ignored.
        """
        if code in _SERVER_CLOSES:
            self.close(code, _SERVER_CLOSES[code])

    def _peer_gone(self) -> None:
        """Record why the peer went away, unless a close was already decided; stop the work."""
        if self.close_code is not None:
            return
        server_code = self.transport.server_close_code()
        if server_code in _SERVER_CLOSES:
            self.close_code, self.close_reason = server_code, _SERVER_CLOSES[server_code]
        else:
            self.close_code, self.close_reason = CLOSE_NORMAL, "client"
        self._stop_work()

    def _stop_work(self) -> None:
        """Cancel the reader and the dispatcher: ``run`` goes on to the close."""
        for scope in self._work_scopes:
            scope.cancel()

    # -- the actor -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until closed by either side. Cancelling it (peer gone) is a normal end.

        The reader runs in the caller's task (no task of its own): ``run`` returns to the close
        when closing cancels the reader's work scope or the reader finds the peer gone.
        """
        metrics.WS_CONNECTIONS.inc()
        structlog.contextvars.bind_contextvars(connection_id=self.id)
        expiry: Timer | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._queue:
                    self._start_writer()
                timers = self._timers
                if timers is None:  # no process-wide timers (tests): run our own
                    timers = Timers()
                    nursery.start_soon(timers.run)
                self.heartbeat.start(
                    timers,
                    self._send_ping,
                    lambda: self.close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat_timeout"),
                )
                if self.expires_in_s is not None:
                    # A socket lives no longer than the credential it was opened with.
                    expiry = timers.call_later(
                        max(0.0, self.expires_in_s),
                        lambda: self.close(CLOSE_TOKEN_EXPIRED, "token_expired"),
                    )
                # The work: the reader here, in this task, and the dispatcher in a task of its
                # own while ops wait; each in a scope that closing cancels.
                reader = trio.CancelScope()
                self._work_scopes.append(reader)
                if self.close_code is not None:
                    reader.cancel()
                try:
                    with reader:
                        await self._reader()
                except TransportClosed:
                    self._peer_gone()
                self._work_scopes.remove(reader)
                self.heartbeat.stop()
                self._stop_work()
                if self.close_reason not in ("client", *_SERVER_CLOSES.values()):
                    await self._send_close(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self.heartbeat.stop()
            if expiry is not None:
                expiry.cancel()
            self._nursery = None
            self._peer_gone()
            self._discard()
            metrics.WS_CONNECTIONS.dec()
            metrics.WS_DISCONNECTS.labels(reason=self.close_reason).inc()
            log.info("ws.closed", code=self.close_code, reason=self.close_reason)
            self.closed.set()

    def _send_ping(self, payload: bytes) -> None:
        """The heartbeat's Ping: written like any frame (direct), else from a task of its own,
        since writing to a client that stopped reading may block until the stream is aborted."""
        nursery = self._nursery
        if nursery is None or self.close_code is not None:
            return
        if self._send_now is not None:
            self._push(Frame(ping_frame(payload)), bounded=False)  # tiny: not held to the bounds
        else:
            nursery.start_soon(self._ping_task, payload)

    async def _ping_task(self, payload: bytes) -> None:
        with contextlib.suppress(TransportClosed):
            await self.transport.ping(payload)

    async def _in_work_scope(self, fn: Callable[[], Awaitable[None]]) -> None:
        scope = trio.CancelScope()
        self._work_scopes.append(scope)
        if self.close_code is not None:
            scope.cancel()
        try:
            with scope:
                await fn()
        except TransportClosed:
            self._peer_gone()
        finally:
            self._work_scopes.remove(scope)

    async def _send_close(self, nursery: trio.Nursery) -> None:
        """The frames already queued, then the close frame; abort past ``close_timeout_s``."""
        assert self.close_code is not None and self.close_reason is not None
        sent = trio.Event()

        async def _close_frame(code: int, reason: str) -> None:
            try:
                if self._written is not None:
                    await self._written.wait()
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

    async def _reader(self) -> None:
        receive = self.transport.receive
        admit = self.handler.admit
        frames_in = metrics.WS_FRAMES.labels(direction="in")
        while True:
            # No local keeps the last frame or op while waiting for the next one: an idle
            # connection would hold them for as long as it stays open.
            item = admit(self, await receive())
            frames_in.inc()
            if item is None:
                continue
            inbox = self._inbox
            if inbox is None:
                inbox = self._inbox = collections.deque()
            while len(inbox) >= self.inbound_size:  # TCP back-pressure on the client
                self._inbox_room = room = trio.Event()
                await room.wait()
            inbox.append(item)
            item = inbox = None
            if not self._dispatching and self._nursery is not None:
                self._dispatching = True
                self._nursery.start_soon(self._in_work_scope, self._dispatcher)

    async def _dispatcher(self) -> None:
        """Handle the admitted ops in order; started by the reader, ends when none is left."""
        inbox = self._inbox
        try:
            while inbox:
                item = inbox.popleft()
                if self._inbox_room is not None:
                    self._inbox_room.set()
                    self._inbox_room = None
                await self.handler.handle(self, item)
        finally:
            self._dispatching = False
            if self._inbox is inbox and not inbox:
                self._inbox = None
