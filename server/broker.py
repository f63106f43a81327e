"""The broker between nodes on PostgreSQL LISTEN/NOTIFY (``actors.broker`` is its interface).

One channel, ``threadline``, per database. Each node LISTENs on it through one dedicated
connection (``Database.listen``, never from the pool) and sends its own notifications through
the same connection. Payloads are text under PostgreSQL's 8,000-byte limit, a one-letter kind
first so a node can skip what it does not need without parsing JSON:

* ``e:<thread>:<seq>:<epoch>:<origin>:<type>:<data>`` a durable event, published by the node
  that committed it, after the commit (``publish``); ``data`` empty when it did not fit, then the
  thread actor reads the event from the log. A node ignores its own (its actors had it first).
* ``x:<thread>:<origin>:<epoch>:<type>:<data>`` an ephemeral event of the reply generated on node
  ``origin`` (an incarnation id); a node ignores its own. A delta too long for one payload is
  split in parts (``part``/``parts`` in ``data``) sent in one statement, so they arrive together
  and in order, and are joined again here.
* ``q:<to>:<from>:<id>:<kind>:<body>`` / ``a:<to>:<id>:<body>`` a request to one node and its
  answer (``request``); used to cancel a reply on the node generating it and to ask it for the
  text streamed so far.
* ``h:<origin>`` a node's hello, sent whenever its listener (re)connects, so the others know at
  once that someone may be watching their ephemeral events.

Ephemeral events leave the node only while another node may be listening: another node was
live at the last heartbeat (``set_peers``), or said hello within ``_HELLO_FRESH_S``. A node
alone in its cluster sends none (deltas are frequent, and a NOTIFY costs the database a write).

Delivery: PostgreSQL delivers every notification committed after LISTEN, in commit order. When
the connection is lost (backend terminated, network, or this node reading too slowly) it is
re-opened with back-off, LISTEN is issued again, and only then is the hub told to ``resync``:
every thread actor re-reads the log from its last seq. A broker outage delays, never loses.

Outbox: this node's ephemeral events and requests wait in a bounded queue (``OUTBOX_SIZE``); when
it is full they are dropped (ephemeral events are best-effort: the durable closing event carries
the whole text). Several queued payloads go out in one statement.

Metrics: ``threadline_broker_messages_total{direction}`` (in: every payload received, out: every
payload sent) and ``threadline_broker_lag_seconds`` (commit or publication time on the sending
node, by the database's and this node's wall clocks, to arrival here).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from actors.broker import BrokerSink
from server import metrics
from server.db import Database, Listener, ListenerLost
from server.errors import Unavailable
from server.events import ThreadEvent

log = structlog.get_logger(__name__)

CHANNEL = "threadline"
# PostgreSQL refuses payloads of 8,000 bytes or more; stay clear of it.
MAX_PAYLOAD_BYTES = 7900
OUTBOX_SIZE = 4096
# Notifications received but not yet handled; beyond it the connection is dropped and re-opened
# (and the log re-read), so a stalled node never makes PostgreSQL's queue grow without bound.
INBOX_SIZE = 20_000
_BATCH = 256
_PING_INTERVAL_S = 5.0
_PING_TIMEOUT_S = 5.0
_BACKOFF_MIN_S = 0.05
# Also how long /readyz can stay 503 after the database is back (the cluster check waits for
# this connection): 5 s kept nodes out of rotation 3-5 s after an 8 s outage had ended.
_BACKOFF_MAX_S = 1.0
# A hello counts as a peer for this long, bridging the gap until the next heartbeat lists it.
_HELLO_FRESH_S = 60.0

_REPLY_ENDS = frozenset({"assistant.completed", "assistant.failed"})

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class PgBroker:
    """``actors.broker.Broker`` on PostgreSQL; ``run()`` it in a nursery, ``attach`` the hub."""

    def __init__(self, db: Database, incarnation: str, node_id: str = "") -> None:
        self._db = db
        self.incarnation = incarnation
        # Shown in pg_stat_activity, so an operator can tell the nodes' connections apart.
        self.application_name = f"threadline-broker:{node_id}" if node_id else "threadline-broker"
        self._sink: BrokerSink | None = None
        self._out_send, self._out_recv = trio.open_memory_channel[str](OUTBOX_SIZE)
        self._handlers: dict[str, Handler] = {}
        self._pending: dict[str, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._parts: dict[tuple[str, str, int], list[str]] = {}
        self._reply_watches: dict[str, list[trio.Event]] = {}
        self._nursery: trio.Nursery | None = None
        self.connected = False
        self.connects = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._lost_at = 0.0  # trio time the connection was last lost
        self._failed_attempts = 0  # reconnection attempts failed since then
        self.listener_pid: int | None = None
        self._peers_at_beat = True  # until the first heartbeat says otherwise
        self._hello_at: dict[str, float] = {}  # other nodes' hellos (trio clock)

    def set_peers(self, incarnations: set[str]) -> None:
        """The live nodes as of the last heartbeat (a ``Cluster`` observer)."""
        self._peers_at_beat = bool(incarnations - {self.incarnation})
        now = trio.current_time()
        for origin, at in list(self._hello_at.items()):
            if now - at >= _HELLO_FRESH_S:
                del self._hello_at[origin]

    @property
    def peers(self) -> bool:
        """Whether another node may be listening to this node's ephemeral events."""
        if self._peers_at_beat:
            return True
        now = trio.current_time()
        return any(now - at < _HELLO_FRESH_S for at in self._hello_at.values())

    def attach(self, sink: BrokerSink) -> None:
        """Deliver incoming events to ``sink`` from now on (events before that are skipped:
        no actor could have been waiting for them)."""
        self._sink = sink

    def handle(self, kind: str, handler: Handler) -> None:
        """Answer requests of ``kind`` from other nodes with ``await handler(body)``."""
        self._handlers[kind] = handler

    # -- outgoing ----------------------------------------------------------------------------

    def publish(self, event: ThreadEvent) -> None:
        """``Broker.publish``: queue an event of this node for the others; never blocks.

        A durable event lost here (a full outbox, a broken connection) is still delivered: every
        node's thread actors compare their last seq with the database's every second.
        """
        if not self.peers:
            return
        if event.seq is None:
            for payload in self._ephemeral_payloads(event):
                self._queue(payload)
        else:
            self._queue(self._durable_payload(event))

    def _durable_payload(self, event: ThreadEvent) -> str:
        committed = time.time() - max(0.0, trio.current_time() - event.committed_at)
        head = f"e:{event.thread_id}:{event.seq}:{committed:.6f}:{self.incarnation}:{event.type}:"
        body = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False, default=str)
        if len(head) + len(body.encode()) <= MAX_PAYLOAD_BYTES:
            return head + body
        return head  # too big: the receivers read it from the log

    def _queue(self, payload: str) -> bool:
        try:
            self._out_send.send_nowait(payload)
            return True
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("broker.outbox_full", dropped=self.dropped)
            return False

    def _ephemeral_payloads(self, event: ThreadEvent) -> list[str]:
        head = f"x:{event.thread_id}:{self.incarnation}:{time.time():.6f}:{event.type}:"
        body = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
        if len(head) + len(body.encode()) <= MAX_PAYLOAD_BYTES:
            return [head + body]
        text = str(event.data.get("text", ""))
        # JSON escaping takes at most 6 bytes per character (\uXXXX), UTF-8 at most 4.
        room = (MAX_PAYLOAD_BYTES - len(head) - 200) // 6
        chunks = [text[i : i + room] for i in range(0, len(text), room)] or [""]
        payloads = []
        for number, chunk in enumerate(chunks):
            data = {**event.data, "text": chunk, "part": number, "parts": len(chunks)}
            payloads.append(head + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
        return payloads

    async def request(
        self, to: str, kind: str, body: dict[str, Any], *, timeout_s: float
    ) -> dict[str, Any] | None:
        """Ask node ``to`` (an incarnation) to run its ``kind`` handler; its answer, or None if
        none came within ``timeout_s`` (the node is gone, or the broker is down)."""
        if to == self.incarnation:
            handler = self._handlers.get(kind)
            return await handler(body) if handler is not None else None
        request_id = f"{next(self._ids)}"
        done = trio.Event()
        answer: list[dict[str, Any]] = []
        self._pending[request_id] = (done, answer)
        try:
            payload = f"q:{to}:{self.incarnation}:{request_id}:{kind}:" + json.dumps(body)
            if not self._queue(payload):
                return None
            with trio.move_on_after(timeout_s):
                await done.wait()
            return answer[0] if answer else None
        finally:
            self._pending.pop(request_id, None)

    async def wait_reply_end(self, thread_id: str) -> None:
        """Return when a reply of ``thread_id`` ends (its ``assistant.completed`` or
        ``assistant.failed`` commits, on any node). Callers bound the wait themselves: an end
        committed just before the call, or during a broker outage, is not seen."""
        event = trio.Event()
        self._reply_watches.setdefault(thread_id, []).append(event)
        try:
            await event.wait()
        finally:
            waiting = self._reply_watches.get(thread_id)
            if waiting is not None and event in waiting:
                waiting.remove(event)
                if not waiting:
                    del self._reply_watches[thread_id]

    # -- the connection ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled, re-opening a lost connection with back-off.

        The first connection must succeed (``Unavailable`` otherwise): a node does not serve
        without its broker. ``task_status.started()`` once it LISTENs.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            backoff = _BACKOFF_MIN_S
            while True:
                lost: BaseException | None = None
                try:
                    async with self._db.listen(
                        CHANNEL, buffer=INBOX_SIZE, application_name=self.application_name
                    ) as listener:
                        self._on_connected(listener)
                        if self.connects == 1:
                            task_status.started()
                        backoff = _BACKOFF_MIN_S
                        await self._serve(listener)
                except* (ListenerLost, Unavailable) as group:
                    lost = group
                if lost is not None:
                    if self.connects == 0:
                        raise lost
                    self._on_lost(_describe(lost))
                await trio.sleep(backoff)
                backoff = min(_BACKOFF_MAX_S, backoff * 2)

    def _on_connected(self, listener: Listener) -> None:
        self.connects += 1
        self.connected = True
        self.listener_pid = listener.backend_pid
        self._queue(f"h:{self.incarnation}")
        if self.connects > 1:
            # LISTEN is in place again: whatever was committed meanwhile is in the log.
            log.warning(
                "broker.reconnected",
                connects=self.connects,
                error=self.last_error,
                failed_attempts=self._failed_attempts,
                down_s=round(trio.current_time() - self._lost_at, 2),
            )
            if self._sink is not None:
                self._sink.resync()
        else:
            log.info("broker.listening", channel=CHANNEL)

    def _on_lost(self, why: str) -> None:
        """A connection lost, or a reconnection attempt failed: a warning for the loss, then
        one debug line per failed attempt (every second at most during an outage); the
        reconnection's warning says how many attempts failed and for how long."""
        if self.connected:
            self._lost_at = trio.current_time()
            self._failed_attempts = 0
            log.warning("broker.connection_lost", error=why)
        else:
            self._failed_attempts += 1
            log.debug("broker.reconnect_failed", error=why, attempts=self._failed_attempts)
        self.connected = False
        self.last_error = why

    async def _serve(self, listener: Listener) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop, listener)
            nursery.start_soon(self._ping_loop, listener)
            while True:
                payload = await listener.receive()
                metrics.BROKER_MESSAGES.labels(direction="in").inc()
                try:
                    self._dispatch(payload)
                except (ValueError, KeyError, TypeError):
                    log.warning("broker.bad_payload", head=payload[:60])

    async def _send_loop(self, listener: Listener) -> None:
        out = metrics.BROKER_MESSAGES.labels(direction="out")
        while True:
            batch = [await self._out_recv.receive()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._out_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            # Lost with the connection if it fails now: these are ephemeral or requests, whose
            # senders time out; durable events never travel this way.
            await listener.notify(batch)
            out.inc(len(batch))

    async def _ping_loop(self, listener: Listener) -> None:
        """A connection that silently died (no RST) would never say so: ask it now and then."""
        while True:
            await trio.sleep(_PING_INTERVAL_S)
            with trio.move_on_after(_PING_TIMEOUT_S) as scope:
                await listener.ping()
            if scope.cancelled_caught:
                raise ListenerLost("ping timeout")

    # -- incoming ----------------------------------------------------------------------------

    def _dispatch(self, payload: str) -> None:
        kind = payload[:2]
        if kind == "e:":
            self._durable(payload)
        elif kind == "x:":
            self._ephemeral(payload)
        elif kind == "q:":
            self._request(payload)
        elif kind == "a:":
            self._answer(payload)
        elif kind == "h:":
            origin = payload[2:]
            if origin != self.incarnation:
                self._hello_at[origin] = trio.current_time()
        else:
            raise ValueError(kind)

    def _durable(self, payload: str) -> None:
        _, thread_id, seq_s, epoch, origin, type_, body = payload.split(":", 6)
        lag = max(0.0, time.time() - float(epoch))
        metrics.BROKER_LAG.observe(lag)
        if type_ in _REPLY_ENDS and thread_id in self._reply_watches:
            for waiter in self._reply_watches.pop(thread_id):
                waiter.set()
        if origin == self.incarnation:
            return  # our own: published in-process after the commit already
        sink = self._sink
        if sink is None:
            return
        seq = int(seq_s)
        known = sink.known_seq(thread_id)
        if known is None or seq <= known:
            return  # nobody here listens, or delivered already (our own commit, published)
        if not body:
            sink.notice(thread_id, seq)
            return
        committed_at = trio.current_time() - lag
        sink.deliver(ThreadEvent(thread_id, type_, seq, json.loads(body), committed_at))

    def _ephemeral(self, payload: str) -> None:
        _, thread_id, origin, epoch, type_, body = payload.split(":", 5)
        if origin == self.incarnation:
            return
        lag = max(0.0, time.time() - float(epoch))
        metrics.BROKER_LAG.observe(lag)
        sink = self._sink
        if sink is None or sink.known_seq(thread_id) is None:
            return
        data = json.loads(body)
        if "parts" in data:
            if len(self._parts) > 1000:  # parts of deltas whose rest never came: forget them
                self._parts.clear()
            key = (origin, str(data.get("message_id")), int(data.get("index", -1)))
            parts = self._parts.setdefault(key, [])
            parts.append(str(data.pop("text", "")))
            if int(data.pop("part")) + 1 < int(data.pop("parts")):
                return
            data["text"] = "".join(self._parts.pop(key))
        committed_at = trio.current_time() - lag
        sink.deliver(ThreadEvent(thread_id, type_, None, data, committed_at, origin=origin))

    def _request(self, payload: str) -> None:
        _, to, sender, request_id, kind, body = payload.split(":", 5)
        if to != self.incarnation:
            return
        handler = self._handlers.get(kind)
        if handler is None or self._nursery is None:
            return
        self._nursery.start_soon(self._respond, handler, sender, request_id, json.loads(body))

    async def _respond(
        self, handler: Handler, sender: str, request_id: str, body: dict[str, Any]
    ) -> None:
        try:
            answer = await handler(body)
        except Exception:  # a failed handler leaves the requester to its timeout
            log.exception("broker.handler_failed")
            return
        body_text = json.dumps(answer, separators=(",", ":"), ensure_ascii=False)
        chunks = _chunks(body_text, MAX_PAYLOAD_BYTES - 200)
        for number, chunk in enumerate(chunks):
            self._queue(f"a:{sender}:{request_id}:{number}:{len(chunks)}:{chunk}")

    def _answer(self, payload: str) -> None:
        _, to, request_id, number, count, chunk = payload.split(":", 5)
        if to != self.incarnation:
            return
        pending = self._pending.get(request_id)
        if pending is None:
            return
        done, answer = pending
        key = (to, request_id, -1)
        parts = self._parts.setdefault(key, [])
        parts.append(chunk)
        if int(number) + 1 == int(count):
            answer.append(json.loads("".join(self._parts.pop(key))))
            done.set()

    def health(self) -> dict[str, Any]:
        """Figures for the ``/readyz`` ``cluster`` check."""
        return {
            "connected": self.connected,
            "connects": self.connects,
            "outbox": self._out_recv.statistics().current_buffer_used,
            "dropped": self.dropped,
            "error": self.last_error,
        }


def _chunks(text: str, max_bytes: int) -> list[str]:
    """``text`` cut into pieces of at most ``max_bytes`` bytes of UTF-8 (whole characters)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for char in text:
        width = len(char.encode())
        if size + width > max_bytes:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(char)
        size += width
    chunks.append("".join(current))
    return chunks


def _describe(error: BaseException) -> str:
    """The first leaf of a (possibly nested) exception group, as ``Type: message``."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"
