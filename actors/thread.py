"""The thread actor: one per live thread; holds its subscribers and fans its events out.

State: the subscribers, the last durable ``seq`` delivered, the text so far of each assistant
reply being streamed, and the named child tasks (assistant replies) running under it.

Mailbox: ``trio.open_memory_channel(settings.thread_mailbox)`` (default 1,024 messages).
Overflow action: a *publish* that finds the mailbox full is dropped and the actor is marked
``lagging``; durable events are already in ``thread_events``, so the actor re-reads the missing
range from the log before delivering anything newer (subscribers still see every seq exactly
once, in order). Dropped ephemeral events (deltas) are lost by design: the durable
``assistant.completed`` carries the final text. Control messages (subscribe, run a child, cancel)
are never dropped: async callers wait for room, ``run_in_thread`` raises ``Unavailable``.

Intake: events reach the actor from this node (``publish``, after commit) and from the other
nodes through the broker (``publish`` again, and ``notice`` for a durable event that did not fit
the broker: it is read from the log); a durable seq already delivered is ignored, so the same
event arriving both ways is delivered once. ``resync`` (the broker lost its connection) makes the
actor re-read the log from its last seq before delivering anything newer.

Fan-out never awaits a subscriber: each event's WebSocket frame is built once (``encode``:
JSON, UTF-8 and the frame header, see ``actors/frames.py``) and the same bytes are offered to
every subscriber with ``send_nowait`` semantics (``Subscriber.offer``, which never
checkpoints); a subscriber over its queue's bounds is dropped on the spot and told so (its
connection closes 4002 ``slow_consumer``). Metrics are counted once per event, not per frame.
A thread with more than ``FAN_OUT_SLICE`` subscribers is served in slices of that many, with a
(cancel-shielded) checkpoint between two slices: an event to 10,000 subscribers takes about
140 ms of Python, which would otherwise hold every other task of the process (requests, pings,
other threads) for that long. The next event waits for this one to be offered to all, so each
subscriber still gets every frame once, in order; one that left between two slices (a closing
connection's ``Hub.forget``) is skipped.

Lifetime: started by the hub in the hub's nursery; stops by itself after
``thread_idle_timeout_s`` with no subscriber and no child running; stopping and leaving the hub's
registry happen together, with no checkpoint in between, so there is never a second actor for
the same thread. If the actor itself fails, every subscriber is dropped with reason ``error``
(clients reconnect with ``after_seq`` and lose nothing) and the next use starts a fresh actor.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

import structlog
import trio

from actors.frames import Frame, text_frame
from server import metrics
from server.errors import Unavailable
from server.events import ThreadEvent

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Subscribers offered one frame between two checkpoints of a large fan-out (about 14 ms of work).
FAN_OUT_SLICE = 1000
DropReason = Literal["slow_consumer", "error", "shutdown"]


class Subscriber(Protocol):
    """What a thread actor needs of a subscriber (a connection actor implements it)."""

    def offer(self, frame: Frame) -> bool:
        """Write or queue ``frame`` without waiting (no checkpoint); False if over its bounds."""

    async def put(self, frame: Frame) -> None:
        """Queue ``frame``, waiting for room (used by the subscriber's own task for replay)."""

    def dropped(self, thread_id: str, reason: DropReason) -> None:
        """The actor removed this subscriber; must not block."""


@dataclass(frozen=True, slots=True)
class Inflight:
    """A reply being generated when the actor starts (on this node or another)."""

    message_id: str
    text: str  # the text of deltas ``0 .. next_index - 1``
    next_index: int | None  # None: unknown (``text`` is the last save; later deltas are added)


@dataclass(frozen=True, slots=True)
class ThreadStart:
    """What an actor starts from: the last committed seq and the replies in flight."""

    last_seq: int
    inflight: list[Inflight] = field(default_factory=list)


class EventLog(Protocol):
    """Read access to the durable ``thread_events`` log (``server/storage/events.py``)."""

    async def start(self, thread_id: str) -> ThreadStart:
        """The thread's last committed seq, and its replies being generated (with their text so
        far, asked of the node generating each)."""

    async def last_seq(self, thread_id: str) -> int:
        """The thread's last committed seq (0 when it has none)."""

    async def last_seqs(self, thread_ids: list[str]) -> dict[str, int]:
        """The last committed seq of each of these threads (those that exist)."""

    async def read(self, thread_id: str, after_seq: int, upto_seq: int) -> list[ThreadEvent]:
        """Events with ``after_seq < seq <= upto_seq`` in seq order."""


class Reply(Generic[T]):
    """A one-shot answer from an actor to whoever sent it a message (a value or an error)."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: Exception | None = None

    def set(self, value: T) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: Exception) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    async def wait(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


# -- messages (frozen dataclasses; the mailbox carries nothing else) -------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    event: ThreadEvent


@dataclass(frozen=True, slots=True)
class Notice:
    seq: int  # committed; read it (and anything before it not yet delivered) from the log


@dataclass(frozen=True, slots=True)
class Resync:
    """Wake the actor: it is ``lagging`` and re-reads the log."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    subscriber: Subscriber
    reply: Reply[int]  # the last seq the subscriber's replay must cover


@dataclass(frozen=True, slots=True)
class GoLive:
    subscriber: Subscriber
    replayed_upto: int
    reply: Reply[bool]  # False when the subscriber was dropped meanwhile


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    subscriber: Subscriber
    reply: Reply[bool] | None = None


@dataclass(frozen=True, slots=True)
class RunChild:
    name: str
    fn: Callable[[], Awaitable[None]]
    attempt: int = 0  # 1 when handed on from an actor that failed before running it


@dataclass(frozen=True, slots=True)
class CancelChild:
    name: str
    reply: Reply[bool]


@dataclass(frozen=True, slots=True)
class ChildDone:
    name: str
    scope: trio.CancelScope


Message = (
    Publish
    | Notice
    | Resync
    | Subscribe
    | GoLive
    | Unsubscribe
    | RunChild
    | CancelChild
    | ChildDone
)


@dataclass(slots=True)
class _SubState:
    live: bool = False
    # Durable frames that arrived while the subscriber was replaying: (seq, frame).
    backlog: list[tuple[int, Frame]] = field(default_factory=list)


def encode(event: ThreadEvent) -> Frame:
    """The event's WebSocket frame, built once for every subscriber."""
    text = json.dumps(event.wire(), separators=(",", ":"), ensure_ascii=False)
    return text_frame(text, event.committed_at)


class ThreadActor:
    """One live thread. Talk to it through ``mailbox`` (see the module docstring)."""

    def __init__(
        self,
        thread_id: str,
        *,
        log_reader: EventLog,
        mailbox_size: int,
        idle_timeout_s: float,
        backlog_limit: int,
        on_stop: Callable[[ThreadActor], None],
        on_orphan: Callable[[RunChild], None] | None = None,
    ) -> None:
        self.thread_id = thread_id
        self.mailbox, self._inbox = trio.open_memory_channel[Message](mailbox_size)
        self._log = log_reader
        self._idle_timeout_s = idle_timeout_s
        self._backlog_limit = backlog_limit
        self._on_stop = on_stop
        self._on_orphan = on_orphan
        self.subscribers: dict[Subscriber, _SubState] = {}
        self.children: dict[str, list[trio.CancelScope]] = {}
        self.inflight: dict[str, list[str]] = {}  # message_id -> text parts so far
        self._local_replies: set[str] = set()  # inflight message ids generated on this node
        self._next_delta: dict[str, int] = {}  # message_id -> index of the next delta expected
        self.last_seq = 0
        self.lagging = False
        self.stopped = False

    # -- called by the hub (synchronous, never blocks) -------------------------------------

    def publish(self, event: ThreadEvent) -> None:
        """Offer an event; on a full mailbox mark the actor lagging (it catches up from the log)."""
        try:
            self.mailbox.send_nowait(Publish(event))
        except trio.WouldBlock:
            if event.seq is not None:
                self.lagging = True
            log.warning("thread.mailbox_full", thread_id=self.thread_id, type=event.type)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # stopped meanwhile; the event is in the log for the next actor

    def notice(self, seq: int) -> None:
        """Durable event ``seq`` was committed elsewhere and must be read from the log."""
        if seq <= self.last_seq:
            return
        try:
            self.mailbox.send_nowait(Notice(seq))
        except trio.WouldBlock:
            self.lagging = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def resync(self) -> None:
        """Re-read the log from the last seq delivered (events may have been missed)."""
        self.lagging = True
        try:
            self.mailbox.send_nowait(Resync())
        except trio.WouldBlock:
            pass  # a full mailbox wakes the actor anyway, and it catches up after that message
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- the actor ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the mailbox until idle or cancelled; never raises except ``Cancelled``."""
        metrics.THREAD_ACTORS.inc()
        # Spawned from whichever task used the thread first: drop that task's log context.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(thread_id=self.thread_id)
        try:
            async with trio.open_nursery() as children:
                try:
                    start = await self._log.start(self.thread_id)
                    self.last_seq = start.last_seq
                    for reply in start.inflight:
                        self.inflight[reply.message_id] = [reply.text] if reply.text else []
                        if reply.next_index is not None:
                            self._next_delta[reply.message_id] = reply.next_index
                    await self._serve(children)
                except Exception as exc:  # a failed actor drops its subscribers (see docstring)
                    log.exception("thread.actor_failed", error=type(exc).__name__)
                    metrics.ACTOR_RESTARTS.labels(actor="thread").inc()
                    unanswered = self._drain()
                    self._leave()
                    self._drop_all("error")
                    self._fail_pending(unanswered)
                children.cancel_scope.cancel()
        finally:
            self._leave()
            metrics.THREAD_ACTORS.dec()

    def _drain(self) -> list[Message]:
        """Take whatever is still in the mailbox (before it is closed)."""
        pending: list[Message] = []
        while True:
            try:
                pending.append(self._inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return pending

    def _fail_pending(self, pending: list[Message]) -> None:
        """Answer every waiting sender at once; hand unstarted children to a fresh actor once."""
        for message in pending:
            if isinstance(message, Subscribe | GoLive | CancelChild):
                message.reply.fail(Unavailable("The thread restarted; try again."))
            elif isinstance(message, Unsubscribe) and message.reply is not None:
                message.reply.set(False)
            elif isinstance(message, RunChild):
                if message.attempt == 0 and self._on_orphan is not None:
                    self._on_orphan(message)
                else:
                    log.error("thread.child_lost", child=message.name)

    async def _serve(self, children: trio.Nursery) -> None:
        while True:
            message: Message | None = None
            if self._idle():
                with trio.move_on_after(self._idle_timeout_s):
                    message = await self._inbox.receive()
                if message is None:
                    # Idle for the whole timeout. Leave only if nothing arrived meanwhile;
                    # no checkpoint between this check and leaving the registry.
                    if self._idle() and self._inbox.statistics().current_buffer_used == 0:
                        self._leave()
                        log.debug("thread.idle_stop")
                        return
                    continue
            else:
                message = await self._inbox.receive()
            await self._handle(message, children)
            if self.lagging:
                await self._catch_up(upto=None)

    def _idle(self) -> bool:
        return not self.subscribers and not self.children

    def _leave(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._inbox.close()  # later sends raise BrokenResourceError: callers retry anew
            self._on_stop(self)

    async def _handle(self, message: Message, children: trio.Nursery) -> None:
        if isinstance(message, Publish):
            await self._on_publish(message.event)
        elif isinstance(message, Notice):
            if message.seq > self.last_seq:
                await self._catch_up(upto=message.seq)
        elif isinstance(message, Resync):
            pass  # ``lagging`` is set: the loop catches up after this message
        elif isinstance(message, Subscribe):
            self.subscribers[message.subscriber] = _SubState()
            message.reply.set(self.last_seq)
        elif isinstance(message, GoLive):
            message.reply.set(self._go_live(message.subscriber, message.replayed_upto))
        elif isinstance(message, Unsubscribe):
            found = self.subscribers.pop(message.subscriber, None) is not None
            if message.reply is not None:
                message.reply.set(found)
        elif isinstance(message, RunChild):
            scope = trio.CancelScope()
            self.children.setdefault(message.name, []).append(scope)
            children.start_soon(self._child, message.name, message.fn, scope)
        elif isinstance(message, CancelChild):
            scopes = self.children.get(message.name, [])
            for scope in scopes:
                scope.cancel()
            message.reply.set(bool(scopes))
        elif isinstance(message, ChildDone):
            scopes = self.children.get(message.name, [])
            if message.scope in scopes:
                scopes.remove(message.scope)
            if not scopes:
                self.children.pop(message.name, None)
            if not self.children:
                # No reply of this node can be streaming without a child running it (replies of
                # other nodes end with their durable event, or when their node is swept).
                for message_id in self._local_replies:
                    self.inflight.pop(message_id, None)
                    self._next_delta.pop(message_id, None)
                self._local_replies.clear()

    async def _child(
        self, name: str, fn: Callable[[], Awaitable[None]], scope: trio.CancelScope
    ) -> None:
        try:
            with scope:
                await fn()
        except Exception as exc:
            log.exception("thread.child_failed", child=name, error=type(exc).__name__)
        finally:
            # The mailbox is ours; wait for room rather than lose the bookkeeping message.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self.mailbox.send(ChildDone(name, scope))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    # -- events ------------------------------------------------------------------------------

    async def _on_publish(self, event: ThreadEvent) -> None:
        if event.seq is None:
            if not self._track_inflight(event):
                return  # already in the snapshot the subscribers got
            await self._fan_out(encode(event))
            return
        if event.seq <= self.last_seq:
            return  # already delivered (or replayed from the log by a late subscriber)
        if event.seq > self.last_seq + 1:
            await self._catch_up(upto=event.seq - 1)
        await self._deliver(event)

    async def _catch_up(self, upto: int | None) -> None:
        """Re-read ``(last_seq, upto]`` from the log (everything newer when ``upto`` is None)."""
        self.lagging = False
        if upto is None:
            upto = await self._log.last_seq(self.thread_id)
        if upto <= self.last_seq:
            return
        missing = await self._log.read(self.thread_id, self.last_seq, upto)
        log.info("thread.caught_up", after_seq=self.last_seq, upto=upto, events=len(missing))
        for event in missing:
            if event.seq is not None and event.seq == self.last_seq + 1:
                await self._deliver(event)

    async def _deliver(self, event: ThreadEvent) -> None:
        assert event.seq is not None
        self.last_seq = event.seq
        self._track_inflight(event)
        await self._fan_out(encode(event), event.seq)

    async def _fan_out(self, frame: Frame, seq: int | None = None) -> None:
        """Offer ``frame`` to every live subscriber (durable ones wait in a replaying
        subscriber's backlog); count the frames and the delivery latency once. More than
        ``FAN_OUT_SLICE`` subscribers are served a slice at a time (see the module docstring)."""
        if len(self.subscribers) <= FAN_OUT_SLICE:
            delivered = self._offer_slice(frame, seq, self.subscribers.items())
        else:
            everyone = list(self.subscribers.items())
            delivered = 0
            for start in range(0, len(everyone), FAN_OUT_SLICE):
                if start:
                    # Shielded: a cancellation (shutdown) never cuts an event in half here.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                # Still subscribed? A closing connection may have left meanwhile (Hub.forget).
                current = self.subscribers
                part = [i for i in everyone[start : start + FAN_OUT_SLICE] if i[0] in current]
                delivered += self._offer_slice(frame, seq, part)
        if delivered:
            metrics.WS_FRAMES_OUT.inc(delivered)
            if frame.committed_at is not None:
                metrics.EVENT_DELIVERY.observe(trio.current_time() - frame.committed_at)

    def _offer_slice(
        self, frame: Frame, seq: int | None, subscribers: Iterable[tuple[Subscriber, _SubState]]
    ) -> int:
        """Offer ``frame`` to ``subscribers`` (never checkpoints); drop those over their
        bounds; the number of frames delivered."""
        delivered = 0
        dropped: list[Subscriber] = []
        for sub, state in subscribers:
            if state.live:
                if sub.offer(frame):
                    delivered += 1
                else:
                    dropped.append(sub)
            elif seq is None:
                continue
            elif len(state.backlog) >= self._backlog_limit:
                dropped.append(sub)
            else:
                state.backlog.append((seq, frame))
        for sub in dropped:
            self._drop(sub, "slow_consumer")
        return delivered

    def _track_inflight(self, event: ThreadEvent) -> bool:
        """Keep each reply's text so far; False for an ephemeral event already accounted for
        (a reply snapshotted at start: its ``assistant.started`` and its deltas up to the
        snapshot must not reach subscribers a second time)."""
        message_id = event.data.get("message_id")
        if event.type == "assistant.started" and isinstance(message_id, str):
            if message_id in self.inflight:
                return False
            self.inflight[message_id] = []
            self._next_delta[message_id] = 0
            if event.origin is None:
                self._local_replies.add(message_id)
        elif event.type == "assistant.delta" and isinstance(message_id, str):
            index = event.data.get("index")
            expected = self._next_delta.get(message_id)
            if isinstance(index, int) and expected is not None:
                if index < expected:
                    return False
                self._next_delta[message_id] = index + 1
            parts = self.inflight.get(message_id)
            if parts is not None:
                parts.append(str(event.data.get("text", "")))
        elif event.type in ("assistant.completed", "assistant.failed"):
            ended = message_id if isinstance(message_id, str) else event.data.get("id")
            if isinstance(ended, str):
                self.inflight.pop(ended, None)
                self._next_delta.pop(ended, None)
                self._local_replies.discard(ended)
        return True

    def _go_live(self, sub: Subscriber, replayed_upto: int) -> bool:
        state = self.subscribers.get(sub)
        if state is None:
            return False
        state.live = True
        for seq, frame in state.backlog:
            if seq > replayed_upto and not self._offer(sub, frame):
                return False
        state.backlog.clear()
        for message_id, parts in self.inflight.items():
            snapshot = ThreadEvent(
                thread_id=self.thread_id,
                type="assistant.started",
                seq=None,
                data={"message_id": message_id, "text": "".join(parts)},
            )
            if not self._offer(sub, encode(snapshot)):
                return False
        return True

    def _offer(self, sub: Subscriber, frame: Frame) -> bool:
        if sub.offer(frame):
            metrics.WS_FRAMES_OUT.inc()
            return True
        self._drop(sub, "slow_consumer")
        return False

    def _drop(self, sub: Subscriber, reason: DropReason) -> None:
        if self.subscribers.pop(sub, None) is not None:
            log.info("thread.subscriber_dropped", reason=reason)
            sub.dropped(self.thread_id, reason)

    def _drop_all(self, reason: DropReason) -> None:
        for sub in list(self.subscribers):
            self._drop(sub, reason)
