"""The hub: the registry of thread actors and the API the rest of the server uses.

Attached as ``services.actors``; ``services.publish`` is ``hub.publish``.

API
---
``hub.publish(event)``
    Synchronous, never blocks. Hands a committed durable event (or an ephemeral one) to the
    thread's actor if one is live; with no live actor nobody is listening and the log suffices.
    The event is also offered to the other nodes through the broker.

Reconciliation: every ``reconcile_s`` (1 s) the hub reads the last committed seq of every thread
with a live actor (one statement) and tells each actor that is behind to read the log: an event
committed anywhere reaches every subscriber even when its publication was lost (the writer was
cancelled or died between its commit and its publish, or the broker was down).

``hub.deliver(event)``, ``hub.notice(thread_id, seq)``, ``hub.resync()``, ``hub.known_seq(id)``
    The ``actors.broker.BrokerSink`` intake: events of the other nodes (and this node's own
    durable ones, a second time, straight from the commit; the actor delivers each seq once).

``hub.run_in_thread(thread_id, name, fn)``
    Synchronous, never blocks. Runs ``await fn()`` as a child task of that thread's actor,
    spawning the actor if needed; the actor does not idle-stop while a child runs. Raises
    ``Unavailable`` if the actor's mailbox is full. An exception from ``fn`` is logged and
    swallowed (it never takes the thread down); when the actor stops (server shutdown) ``fn`` is
    cancelled, so it must save what it has in a ``finally`` under a shielded scope with a timeout.

``await hub.cancel_in_thread(thread_id, name) -> bool``
    Cancels every running child called ``name`` in that thread; True if one was running.
    Returns as soon as the cancellation is requested (the child runs its own cleanup).

``await hub.subscribe(thread_id, subscriber, after_seq) -> Subscription``, then
``await hub.finish_subscribe(subscription)``
    The first call registers the subscriber (events arriving from now on are held back for it)
    and returns the last seq the replay covers and how many events it holds (seqs are gap-free).
    The caller sends its reply, then the second call replays ``after_seq < seq <= last_seq``
    from the log through ``subscriber.put`` and switches the subscriber to live delivery, after
    which the held-back events and the in-flight reply snapshot follow: no gap, no duplicate.

``await hub.unsubscribe(thread_id, subscriber)`` / ``hub.forget(subscriber)``
    Remove a subscription (``forget`` is the synchronous, best-effort version used on close).

Nursery: the hub owns one nursery (opened in ``run``, a supervised long-lived actor) in which
every thread actor runs. Ownership of per-thread state lies with each thread actor only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from actors.broker import Broker
from actors.thread import (
    CancelChild,
    EventLog,
    GoLive,
    Message,
    Reply,
    RunChild,
    Subscribe,
    Subscriber,
    ThreadActor,
    Unsubscribe,
    encode,
)
from server.config import Settings
from server.errors import Unavailable
from server.events import ThreadEvent

log = structlog.get_logger(__name__)

# How long a connection may wait for room in a thread actor's mailbox before giving up.
_CONTROL_TIMEOUT_S = 10.0
# Replay reads the log in pages of this many events, so a long history never sits in memory.
_REPLAY_PAGE = 500


@dataclass(frozen=True, slots=True)
class Subscription:
    """The answer to a subscribe: what the client's reply states."""

    thread_id: str
    subscriber: Subscriber
    after_seq: int | None
    last_seq: int

    @property
    def replayed(self) -> int:
        if self.after_seq is None:
            return 0
        return max(0, self.last_seq - self.after_seq)


class Hub:
    """Thread actors by thread id; see the module docstring for the API."""

    def __init__(
        self,
        log_reader: EventLog,
        *,
        mailbox_size: int,
        idle_timeout_s: float,
        backlog_limit: int,
        broker: Broker | None = None,
        reconcile_s: float = 1.0,
    ) -> None:
        self._log = log_reader
        self._broker = broker
        self._reconcile_s = reconcile_s
        self._mailbox_size = mailbox_size
        self._idle_timeout_s = idle_timeout_s
        self._backlog_limit = backlog_limit
        self.actors: dict[str, ThreadActor] = {}
        self._nursery: trio.Nursery | None = None
        self._ready = trio.Event()
        self.spawned = 0

    @classmethod
    def from_settings(
        cls, log_reader: EventLog, settings: Settings, broker: Broker | None = None
    ) -> Hub:
        """A hub sized by ``thread_mailbox``, ``thread_idle_timeout_s``, ``ws_outbound_queue``."""
        return cls(
            log_reader,
            mailbox_size=settings.thread_mailbox,
            idle_timeout_s=settings.thread_idle_timeout_s,
            backlog_limit=settings.ws_outbound_queue,
            broker=broker,
        )

    async def run(self) -> None:
        """Own the nursery of thread actors until cancelled (run it under a supervisor)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._ready.set()
                if self._reconcile_s > 0:
                    nursery.start_soon(self._reconcile)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._ready = trio.Event()
            self.actors.clear()

    async def _reconcile(self) -> None:
        """Every ``reconcile_s``: live actors behind the log read what they missed."""
        while True:
            await trio.sleep(self._reconcile_s)
            ids = [thread_id for thread_id, actor in self.actors.items() if not actor.stopped]
            if not ids:
                continue
            try:
                seqs = await self._log.last_seqs(ids)
            except Exception as exc:  # noqa: BLE001 - the database is away: next round
                log.warning("hub.reconcile_failed", error=type(exc).__name__)
                continue
            behind = 0
            for thread_id, seq in seqs.items():
                actor = self.actors.get(thread_id)
                if actor is not None and seq > actor.last_seq:
                    actor.notice(seq)
                    behind += 1
            if behind:
                log.info("hub.reconciled", behind=behind)

    async def wait_ready(self) -> None:
        """Wait until ``run`` has opened its nursery."""
        await self._ready.wait()

    def health(self) -> dict[str, Any]:
        """Figures for ``/readyz``."""
        return {
            "running": self._nursery is not None,
            "thread_actors": len(self.actors),
            "subscribers": sum(len(a.subscribers) for a in self.actors.values()),
            "children": sum(len(s) for a in self.actors.values() for s in a.children.values()),
        }

    # -- actors --------------------------------------------------------------------------------

    def _actor(self, thread_id: str) -> ThreadActor:
        """The live actor of ``thread_id``, spawned if there is none. Never checkpoints."""
        actor = self.actors.get(thread_id)
        if actor is not None and not actor.stopped:
            return actor
        if self._nursery is None:
            raise Unavailable("The server is not ready for realtime traffic.")
        actor = ThreadActor(
            thread_id,
            log_reader=self._log,
            mailbox_size=self._mailbox_size,
            idle_timeout_s=self._idle_timeout_s,
            backlog_limit=self._backlog_limit,
            on_stop=self._stopped,
            on_orphan=lambda message: self._resubmit(thread_id, message),
        )
        self.actors[thread_id] = actor
        self.spawned += 1
        self._nursery.start_soon(actor.run, name=f"thread:{thread_id}")
        return actor

    def _resubmit(self, thread_id: str, message: RunChild) -> None:
        """A child its failed actor never started: give it to a fresh actor (once)."""
        try:
            actor = self._actor(thread_id)
            actor.mailbox.send_nowait(RunChild(message.name, message.fn, attempt=1))
        except (Unavailable, trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.exception("thread.child_lost", thread_id=thread_id, child=message.name)

    def _stopped(self, actor: ThreadActor) -> None:
        if self.actors.get(actor.thread_id) is actor:
            del self.actors[actor.thread_id]

    async def _send(
        self, thread_id: str, make: Callable[[], Message], *, spawn: bool = True
    ) -> bool:
        """Put a control message into the thread's mailbox, retrying if that actor just stopped."""
        with trio.fail_after(_CONTROL_TIMEOUT_S):
            while True:
                if spawn:
                    actor = self._actor(thread_id)
                else:
                    found = self.actors.get(thread_id)
                    if found is None:
                        return False
                    actor = found
                try:
                    await actor.mailbox.send(make())
                    return True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    if actor.stopped:
                        continue
                    raise

    # -- the API -------------------------------------------------------------------------------

    def publish(self, event: ThreadEvent) -> None:
        """``services.publish``: hand an event to the thread's live actor, if any. Never blocks."""
        actor = self.actors.get(event.thread_id)
        if actor is not None:
            actor.publish(event)
        if self._broker is not None:
            self._broker.publish(event)

    # -- the broker's intake (actors.broker.BrokerSink) ---------------------------------------

    def known_seq(self, thread_id: str) -> int | None:
        """The last seq the thread's live actor delivered; None if it has none."""
        actor = self.actors.get(thread_id)
        return None if actor is None or actor.stopped else actor.last_seq

    def deliver(self, event: ThreadEvent) -> None:
        """An event from the broker: to the thread's live actor, if any. Never blocks."""
        actor = self.actors.get(event.thread_id)
        if actor is not None:
            actor.publish(event)

    def notice(self, thread_id: str, seq: int) -> None:
        """A durable event to read from the log, if the thread has a live actor here."""
        actor = self.actors.get(thread_id)
        if actor is not None:
            actor.notice(seq)

    def resync(self) -> None:
        """Every live actor re-reads the log from its last seq (the broker missed events)."""
        for actor in list(self.actors.values()):
            actor.resync()
        log.info("hub.resync", thread_actors=len(self.actors))

    def run_in_thread(self, thread_id: str, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` as a child of the thread's actor (see module docstring). Never blocks."""
        for _ in range(2):
            actor = self._actor(thread_id)
            try:
                actor.mailbox.send_nowait(RunChild(name, fn))
                return
            except trio.WouldBlock:
                raise Unavailable("The thread is too busy; try again.") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue  # stopped just now; the next lookup spawns a fresh actor
        raise Unavailable("The thread is restarting; try again.")

    async def cancel_in_thread(self, thread_id: str, name: str) -> bool:
        """Cancel the child ``name`` of that thread; True if one was running."""
        reply: Reply[bool] = Reply()
        if not await self._send(thread_id, lambda: CancelChild(name, reply), spawn=False):
            return False
        with trio.fail_after(_CONTROL_TIMEOUT_S):
            return await reply.wait()

    async def subscribe(
        self, thread_id: str, subscriber: Subscriber, after_seq: int | None
    ) -> Subscription:
        """Register ``subscriber`` (held back until ``finish_subscribe``)."""
        reply: Reply[int] = Reply()
        await self._send(thread_id, lambda: Subscribe(subscriber, reply))
        with trio.fail_after(_CONTROL_TIMEOUT_S):
            last_seq = await reply.wait()
        return Subscription(thread_id, subscriber, after_seq, last_seq)

    async def finish_subscribe(self, sub: Subscription) -> bool:
        """Replay from the log, then go live. False if the subscriber was dropped meanwhile."""
        if sub.after_seq is not None:
            cursor = sub.after_seq
            while cursor < sub.last_seq:
                upto = min(sub.last_seq, cursor + _REPLAY_PAGE)
                for event in await self._log.read(sub.thread_id, cursor, upto):
                    await sub.subscriber.put(encode(event))
                cursor = upto
        reply: Reply[bool] = Reply()
        if not await self._send(
            sub.thread_id, lambda: GoLive(sub.subscriber, sub.last_seq, reply), spawn=False
        ):
            return False
        with trio.fail_after(_CONTROL_TIMEOUT_S):
            return await reply.wait()

    async def unsubscribe(self, thread_id: str, subscriber: Subscriber) -> bool:
        """Remove the subscription; True if there was one."""
        reply: Reply[bool] = Reply()
        if not await self._send(thread_id, lambda: Unsubscribe(subscriber, reply), spawn=False):
            return False
        with trio.fail_after(_CONTROL_TIMEOUT_S):
            return await reply.wait()

    def forget(self, thread_id: str, subscriber: Subscriber) -> None:
        """Best-effort, non-blocking unsubscribe for a closing connection."""
        actor = self.actors.get(thread_id)
        if actor is None:
            return
        try:
            actor.mailbox.send_nowait(Unsubscribe(subscriber))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            # A full mailbox: drop the entry directly. Safe: no checkpoint, same trio thread,
            # and the actor tolerates a missing subscriber in every message it handles.
            actor.subscribers.pop(subscriber, None)
