"""Assistant replies: the ``Assistant`` the command bus and the WebSocket transport call.

A reply, for one ``ReplyRequest``:

1. **Start** (one transaction): lock the thread; build the prompt from the latest summary and
   recent turns; check the content filter; if the project has a budget, lock the project row
   and check it (recorded spend + reservations + this reply's worst-case cost must fit
   ``monthly_budget_usd``; a budget set concurrently with a start applies from the next one);
   insert the assistant message (``streaming``, seq = next, with its ``message.created`` event)
   and reserve the worst-case cost. A refused reply is inserted ``failed`` with ``assistant.failed``
   (``budget_exceeded`` / ``content_filtered``) and no provider is called.
   A reply asked for by a send (``request.history``: the send's statement read the summary and
   turns under its thread lock) starts in one statement, ``tl_start_reply``, with BEGIN and
   COMMIT in the same trip; it writes nothing if anything was written in the thread since the
   send (then the start runs as below). Its provider request goes out once it has committed, so
   the first token never waits for a COMMIT.
   Since migration 0014 a send usually starts its reply itself, in its own statement
   (``tl_send_and_start``, see ``plan_start``): the request then carries ``started`` and the
   start here only builds the prompt from the turns the statement chose and launches the call.
   Otherwise (a reply requested without history, or a stale one) the start is two trips: lock
   and read, then ``tl_insert_reply`` with its COMMIT. On every path the provider's request goes
   out only once the start has committed: a start whose COMMIT fails has called no provider, so
   no prompt is ever billed without its reply recorded.
2. **Stream**: ``assistant.started {message_id}``, then ``assistant.delta {message_id, index,
   text}`` frames coalesced by ``DeltaCoalescer``; the text so far is saved every
   ``_SAVE_INTERVAL_S`` with unversioned updates.
3. **Finish** (one statement, ``tl_finish_reply``, with its COMMIT in one trip): final content
   and status, the closing durable event
   (``assistant.completed {message_id, content, status, usage}`` with ``"cancelled": true`` for a
   cancel; ``assistant.failed {message_id, content, status, reason, message}`` for a provider
   failure or a shutdown), the usage row (the provider's figures, else a cl100k count marked
   ``estimated``) and the reservation released.

Cancellation: ``cancel(thread_id)`` ends a reply as ``cancelled``; any other cancellation
(server shutdown, the thread actor stopping) ends it as ``interrupted``. Either way the final
write runs shielded, with ``_FINAL_WRITE_TIMEOUT_S``, so the partial text is kept.

One reply per thread at a time, in the whole cluster: a request arriving while the thread's reply
is being generated waits in that thread's queue and starts when the current reply ends; one
arriving on this node while another node generates the thread's reply waits for that reply's
closing event (``messages_one_streaming_reply`` makes it a database invariant). ``cancel`` stops
only the running reply, wherever it runs.

Cluster: the start transaction claims the reply for this node (``messages.claimed_by`` = this
process's incarnation); only the claiming node calls the provider. Other nodes reach it through the
broker: ``cancel`` (answered truthfully, ``{"cancelled": bool}``) and ``snapshot`` (the text
streamed so far and the index of the next delta, for a thread actor starting on another node).
``sweep_stale`` runs every ``THREADLINE_NODE_TIMEOUT_S / 3`` on every node and ends as
``interrupted`` (text saved so far kept) every reply whose node has not been seen for the timeout.

A request that cannot be answered is never dropped silently: beyond ``_QUEUE_LIMIT`` queued
requests (reason ``overloaded``), or while the server shuts down (reason
``unavailable``), it gets a ``failed`` assistant message and an ``assistant.failed`` event, with no
provider call.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import structlog
import trio

from server import metrics
from server.broker import PgBroker
from server.errors import ThreadlineError
from server.events import ThreadEvent
from server.llm import pricing, tokens
from server.llm.client import LLMClient, LLMError
from server.llm.coalesce import DeltaCoalescer
from server.llm.prompt import (
    ContentFiltered,
    Prompt,
    PromptCosts,
    Turn,
    build_prompt,
    check_content,
    message_tokens,
    prompt_costs,
)
from server.llm.provider import Completion, OnText, Usage
from server.services import ReplyHistory, ReplyRequest, ReplyStart, Services, StartedReply
from server.storage import assistant as store

log = structlog.get_logger(__name__)

_SAVE_INTERVAL_S = 2.0
_FINAL_WRITE_TIMEOUT_S = 5.0
_QUEUE_LIMIT = 8
# A worker not running this long after it was handed to the thread's actor is presumed lost.
_WORKER_START_GRACE_S = 10.0
# A streaming reply older than the total timeout plus this cannot be alive in any process.
_STALE_MARGIN_S = 60.0
# The part of THREADLINE_GRACEFUL_TIMEOUT_S that replies in flight get to finish at shutdown; the
# rest covers closing the WebSockets (first) and the final saves of the replies stopped after it.
_DRAIN_SHARE = 0.4
# How long a request to another node (cancel) waits for its answer.
_REMOTE_TIMEOUT_S = 3.0
# A thread actor starting on another node waits this long for the text so far (the answer comes
# in order with the deltas, so waiting costs latency, never text); then it falls back on the
# text saved last.
_SNAPSHOT_TIMEOUT_S = 3.0
# A request waiting for another node's reply in its thread looks again at least this often (the
# closing event usually wakes it first; this covers a broker outage and the dead-node sweep).
_BUSY_RECHECK_S = 1.0

_FAILURE_TEXT = {
    "budget_exceeded": "This project has used its monthly budget.",
    "content_filtered": "The message contains content the assistant is configured to refuse.",
    "circuit_open": "The language model is unavailable; calls are paused for a while.",
    "timeout": "The language model did not answer in time.",
    "provider_error": "The language model failed to answer.",
    "interrupted": "The server stopped while the reply was being written.",
    "overloaded": "Too many replies are waiting in this thread; send the message again later.",
    "unavailable": "The server is shutting down; send the message again in a moment.",
    "internal": "Something went wrong on our side.",
}


@dataclass
class _Reply:
    """One reply in flight (bookkeeping for cancel and shutdown)."""

    request: ReplyRequest
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    stop: str | None = None  # "cancelled" | "interrupted", set before the scope is cancelled
    message_id: str | None = None
    emitted: list[str] = field(default_factory=list)  # text of each delta published so far
    waiting: bool = False  # for the thread's reply on another node to end (not started)


@dataclass
class _Call:
    """The outcome of a reply's provider call: a completion, a typed failure, or neither (a bug,
    logged: the reply fails ``internal``)."""

    done: trio.Event = field(default_factory=trio.Event)
    completion: Completion | None = None
    failure: LLMError | None = None


class _ThreadBusy(Exception):
    """Another reply of the thread is being generated (on another node): wait for its end."""


class _Stale:
    """The history a send read is out of date: the start reads it again (``_STALE``)."""


_STALE = _Stale()


@dataclass(frozen=True, slots=True)
class _Started:
    message: dict[str, Any]
    prompt: Prompt
    model: str
    # The prompt holds every turn since the latest summary (none was cut for length).
    whole_history: bool = False
    # A reply its send started, refused before its call (it ends ``failed`` with this reason).
    refused: str | None = None


class AssistantService:
    """Generates replies under the thread's actor (``services.actors``) or its own nursery.

    ``on_completed`` (the summariser's poke) is called with the thread id after each completed
    reply. ``start_reply`` never blocks; see the module docstring for the rest.
    """

    def __init__(
        self,
        services: Services,
        llm: LLMClient,
        nursery: trio.Nursery,
        *,
        on_completed: Callable[[str], None] | None = None,
    ) -> None:
        self.services = services
        self.settings = services.settings
        self.llm = llm
        self._nursery = nursery
        self._on_completed = on_completed
        self._queues: dict[str, collections.deque[ReplyRequest]] = {}
        self._active: dict[str, _Reply] = {}
        self._spawned_at: dict[str, float] = {}  # workers asked for but not yet running
        self._closing = False
        self._costs: PromptCosts | None = None  # the prompt's fixed costs (settings are fixed)
        self.save_interval_s = _SAVE_INTERVAL_S  # how often a streaming reply's text is saved
        # How long replies in flight may go on finishing at shutdown (see ``shutdown``).
        self.reply_drain_s = self.settings.graceful_timeout_s * _DRAIN_SHARE
        cluster = services.extras.get("cluster")
        # This process's claim on the replies it generates (None: not part of a cluster).
        self.incarnation: str | None = cluster.incarnation if cluster is not None else None
        self._broker: PgBroker | None = services.extras.get("broker")
        if self._broker is not None:
            self._broker.handle("cancel", self._cancel_request)
            self._broker.handle("snapshot", self._snapshot_request)

    # -- the Assistant protocol ----------------------------------------------------------------

    def plan_start(self, thread_id: str, content: str, replying: bool) -> ReplyStart:
        """What a send passes to ``tl_send_and_start`` to start its reply in its own statement:
        the message's token count, the prompt's fixed costs, the prices, the claim and a
        refusal decided here (the content filter). The reply is started there only if no
        request of the thread is queued here (it would start behind them)."""
        settings = self.settings
        model = self.llm.model
        refuse: str | None = None
        if replying:
            try:
                check_content(settings, content)
            except ContentFiltered:
                refuse = "content_filtered"
        price = settings.price_for(model)
        costs = self._costs
        if costs is None:
            costs = self._costs = prompt_costs(settings)
        return ReplyStart(
            tokens=message_tokens(settings, content),
            start=replying and not self._closing and thread_id not in self._queues,
            head_tokens=costs.head,
            summary_overhead=costs.summary_overhead,
            user_overhead=costs.user_overhead,
            assistant_overhead=costs.assistant_overhead,
            prompt_budget=costs.budget,
            price_prompt=Decimal(str(price.prompt_per_1k)),
            price_completion=Decimal(str(price.completion_per_1k)),
            max_reply=settings.llm_max_reply_tokens,
            model=model,
            claimed_by=self.incarnation,
            refuse=refuse,
            refuse_text=None if refuse is None else self._failure_text(refuse),
            budget_text=self._failure_text("budget_exceeded"),
        )

    def start_reply(self, request: ReplyRequest) -> None:
        """Queue a reply for the thread; start the thread's worker if none is running.

        A reply its send started (``request.started``) is already written: refusing it ends it
        (``failed``, with the refusal's reason) instead of writing a refused message."""
        if self._closing:
            self._refuse_soon(request, "unavailable")
            return
        thread_id = request.thread_id
        queue = self._queues.get(thread_id)
        if queue is not None:
            if len(queue) >= _QUEUE_LIMIT and request.started is None:
                self._refuse_soon(request, "overloaded")
                return
            # Behind another reply, whose start and end will write in the thread: the history
            # its send read will be stale by then, and it would only hold memory while it waits.
            queue.append(dataclasses.replace(request, history=None))
            if self._worker_lost(thread_id):
                log.warning("assistant.worker_lost", thread_id=thread_id)
                self._spawn(thread_id, lambda: self._worker(thread_id))
            return
        self._queues[thread_id] = collections.deque([request])
        self._spawn(thread_id, lambda: self._worker(thread_id))

    def _worker_lost(self, thread_id: str) -> bool:
        """A queue whose worker never started (its actor died before running it) is orphaned.

        A running worker always has a reply in ``_active`` (it moves from one to the next with
        no checkpoint in between), so a queue with none, spawned long ago, has no worker.
        """
        spawned = self._spawned_at.get(thread_id)
        return (
            thread_id not in self._active
            and spawned is not None
            and trio.current_time() - spawned > _WORKER_START_GRACE_S
        )

    async def cancel(self, thread_id: str) -> bool:
        """Stop the reply being generated in ``thread_id`` (it ends ``cancelled``), on whichever
        node generates it; True if one was running and has been told to stop."""
        if self._cancel_local(thread_id, None):
            return True
        # Not generating here (or ours has not started yet): it may run on another node.
        async with self.services.db.statements() as tx:
            row = await store.streaming_reply(tx, thread_id)
        if row is None or row["claimed_by"] is None or self._broker is None:
            return False
        owner = str(row["claimed_by"])
        if owner == self.incarnation:
            return False  # ours, and it ended just now
        answer = await self._broker.request(
            owner,
            "cancel",
            {"thread_id": thread_id, "message_id": str(row["id"])},
            timeout_s=_REMOTE_TIMEOUT_S,
        )
        return bool(answer and answer.get("cancelled"))

    def _cancel_local(self, thread_id: str, message_id: str | None) -> bool:
        reply = self._active.get(thread_id)
        if reply is None or reply.done.is_set() or reply.message_id is None:
            return False
        if message_id is not None and reply.message_id != message_id:
            return False
        if reply.stop is None:
            reply.stop = "cancelled"
        reply.scope.cancel()
        return True

    async def _cancel_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """Another node's ``cancel`` for a reply generated here (through the broker)."""
        cancelled = self._cancel_local(str(body["thread_id"]), str(body["message_id"]))
        log.info("assistant.remote_cancel", thread_id=body["thread_id"], cancelled=cancelled)
        return {"cancelled": cancelled}

    async def _snapshot_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """The text streamed so far of a reply generated here, for a thread actor elsewhere:
        the deltas ``0 .. next_index - 1`` joined; ``{}`` if it is not being generated here."""
        reply = self._active.get(str(body["thread_id"]))
        if reply is None or reply.message_id != body.get("message_id") or reply.done.is_set():
            return {}
        emitted = list(reply.emitted)
        return {"text": "".join(emitted), "next_index": len(emitted)}

    async def snapshot(self, thread_id: str, message_id: str, owner: str | None) -> Any:
        """``_snapshot_request`` on the node ``owner`` (this one included); None if no answer."""
        if owner is None or self._broker is None:
            return None
        return await self._broker.request(
            owner,
            "snapshot",
            {"thread_id": thread_id, "message_id": message_id},
            timeout_s=_SNAPSHOT_TIMEOUT_S,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def in_flight(self) -> int:
        return len(self._active)

    async def shutdown(self) -> None:
        """Refuse new replies; let those streaming finish for a while (the drain), then stop the
        rest as ``interrupted`` and wait for their saves.

        The drain lasts ``reply_drain_s`` (0.4 x ``THREADLINE_GRACEFUL_TIMEOUT_S``) from the
        first call; watchers, moved to other nodes by then, keep receiving the reply through the
        broker. A request not started yet is refused (``unavailable``) at once. Called again
        (the plugin's exit), it interrupts at once.
        """
        draining = not self._closing
        self._closing = True
        for queue in self._queues.values():
            while len(queue) > 1:
                self._refuse_soon(queue.pop(), "unavailable")
        for reply in list(self._active.values()):
            if reply.waiting:  # not started: no provider call to wait for
                self._stop(reply)
        if draining and self.reply_drain_s > 0:
            streaming = [r for r in self._active.values() if not r.done.is_set()]
            if streaming:
                log.info("assistant.draining", replies=len(streaming), for_s=self.reply_drain_s)
            with trio.move_on_after(self.reply_drain_s):
                for reply in streaming:
                    await reply.done.wait()
        replies = [r for r in self._active.values() if not r.done.is_set()]
        for reply in replies:
            self._stop(reply)
        with trio.move_on_after(_FINAL_WRITE_TIMEOUT_S + 1):
            for reply in replies:
                await reply.done.wait()

    @staticmethod
    def _stop(reply: _Reply) -> None:
        if reply.stop is None:
            reply.stop = "interrupted"
        reply.scope.cancel()

    async def recover_stale(self) -> int:
        """End replies left ``streaming`` by a process that died (no shutdown hook ran).

        A reply claimed by a node not seen for ``THREADLINE_NODE_TIMEOUT_S`` (or by an earlier
        incarnation of any node) is dead; so is an unclaimed one older than the total timeout
        plus a margin. Each is marked ``interrupted`` with ``assistant.failed`` (reason
        ``interrupted``), keeping its saved text, and its reservation is released. Returns how
        many were ended.
        """
        older_than = self.settings.llm_total_timeout_s + _STALE_MARGIN_S
        db = self.services.db
        rows = await store.stale_streaming(
            db.oneshot,
            node_timeout_s=self.settings.node_timeout_s,
            unclaimed_older_than_s=older_than,
        )
        ended = 0
        for row in rows:
            thread_id, message_id = str(row["thread_id"]), str(row["id"])
            if thread_id in self._active:
                continue
            # The text saved so far is kept and becomes the event's content (filled in by the
            # database). A reply that ended since (its node came back just now) is left alone.
            data = self._failed_payload(message_id, "", "interrupted", "interrupted")
            try:
                found = await store.finish_reply(
                    db.atomic,
                    thread_id=thread_id,
                    project_id=str(row["project_id"]),
                    message_id=message_id,
                    status="interrupted",
                    content=None,
                    model=None,
                    event_type="assistant.failed",
                    payload=data,
                    usage=None,
                )
            except LookupError:  # the thread was deleted since
                continue
            if found is None:
                continue
            seq, data["content"] = found
            self._publish(thread_id, "assistant.failed", seq, data)
            ended += 1
        if ended:
            log.warning("assistant.recovered_stale", count=ended)
        return ended

    async def sweep_stale(self) -> None:
        """Run ``recover_stale`` now and then every ``THREADLINE_NODE_TIMEOUT_S / 3`` (until
        cancelled): a dead node's replies end within the timeout plus one sweep."""
        while True:
            try:
                await self.recover_stale()
            except Exception:  # a janitor's failure must not stop the server; next round retries
                log.exception("assistant.recovery_failed")
            await trio.sleep(self.settings.node_heartbeat_s)

    def _refuse_soon(self, request: ReplyRequest, reason: str) -> None:
        """Record (in a task of our own: callers never block) that ``request`` gets no reply."""
        log.warning("assistant.refused", thread_id=request.thread_id, reason=reason)

        async def record() -> None:
            with trio.CancelScope(shield=True), trio.move_on_after(_FINAL_WRITE_TIMEOUT_S):
                try:
                    started = await self._start(request, refuse=reason)
                    if started is not None and started.refused is not None:
                        # Started by its send, so already written: end it.
                        await self._finish(request, started, "failed", "", None, started.refused)
                except (LookupError, ThreadlineError) as exc:
                    log.warning("assistant.refusal_not_recorded", error=type(exc).__name__)

        try:
            self._nursery.start_soon(record)
        except RuntimeError:  # our nursery is already closed: only the log line remains
            log.warning("assistant.refusal_not_recorded", error="closed")

    def _spawn(self, thread_id: str, fn: Callable[[], Awaitable[None]]) -> None:
        self._spawned_at[thread_id] = trio.current_time()
        hub = self.services.actors
        if hub is not None and hasattr(hub, "run_in_thread"):
            try:
                hub.run_in_thread(thread_id, "reply", fn)
                return
            except ThreadlineError as exc:
                log.warning("assistant.actor_busy", thread_id=thread_id, error=exc.code)
        self._nursery.start_soon(fn)

    async def _worker(self, thread_id: str) -> None:
        """Answer the thread's queued requests one after another."""
        queue = self._queues.get(thread_id)
        if queue is None or thread_id in self._active:
            return  # a respawned worker arriving after the original one: nothing to do
        self._spawned_at.pop(thread_id, None)
        try:
            while queue and not self._closing:
                reply = _Reply(queue[0])
                self._active[thread_id] = reply
                try:
                    # Every log line of the reply (the client's retries included) names it.
                    with (
                        structlog.contextvars.bound_contextvars(
                            thread_id=thread_id, reply_to=reply.request.user_message_id
                        ),
                        reply.scope,
                    ):
                        await self._generate(reply)
                except Exception:
                    # e.g. the database failed the start or the final write: the message (if
                    # any) stays ``streaming`` until ``recover_stale`` ends it; the thread's
                    # next request still runs.
                    log.exception("assistant.reply_error", thread_id=thread_id)
                finally:
                    structlog.contextvars.unbind_contextvars("message_id")
                    reply.done.set()
                    del self._active[thread_id]
                    queue.popleft()
        finally:
            if self._queues.get(thread_id) is queue:
                del self._queues[thread_id]
            # Replies their sends started are written: one left behind at shutdown is ended.
            for request in queue:
                if request.started is not None:
                    self._refuse_soon(request, "unavailable")

    # -- one reply -----------------------------------------------------------------------------

    async def _generate(self, reply: _Reply) -> None:
        request = reply.request
        bound = log.bind(thread_id=request.thread_id, reply_to=request.user_message_id)
        call = _Call()
        parts: list[str] = []
        committed = trio.Event()  # the start published: no delta goes out before it
        index = 0

        def emit(text: str) -> None:
            nonlocal index
            data = {"message_id": reply.message_id, "index": index, "text": text}
            reply.emitted.append(text)
            self._publish(request.thread_id, "assistant.delta", None, data)
            index += 1

        coalescer = DeltaCoalescer(emit)

        async def on_text(text: str) -> None:
            if not committed.is_set():  # answered before assistant.started was published
                await committed.wait()
            parts.append(text)
            coalescer.push(text)

        async with trio.open_nursery() as helpers:

            def launch(started: _Started) -> None:
                # Once the start has committed: the provider's request goes out.
                with structlog.contextvars.bound_contextvars(message_id=started.message["id"]):
                    helpers.start_soon(self._call, started, on_text, call)

            try:
                started = await self._start_when_free(reply, launch)
            except (LookupError, ThreadlineError) as exc:
                helpers.cancel_scope.cancel()  # no commit, so no call was launched
                bound.warning("assistant.not_started", error=type(exc).__name__)
                return
            except BaseException:
                helpers.cancel_scope.cancel()
                raise
            if started is None:
                return
            message_id = started.message["id"]
            reply.message_id = message_id
            structlog.contextvars.bind_contextvars(message_id=message_id)
            self._publish(request.thread_id, "assistant.started", None, {"message_id": message_id})
            committed.set()
            helpers.start_soon(coalescer.run)
            helpers.start_soon(self._save_periodically, message_id, parts)
            try:
                await call.done.wait()
            except BaseException:
                # Cancelled (by ``cancel`` or by shutdown): keep the partial text, shielded.
                coalescer.flush()
                status = reply.stop if reply.stop == "cancelled" else "interrupted"
                with trio.CancelScope(shield=True), trio.move_on_after(_FINAL_WRITE_TIMEOUT_S):
                    await self._finish(request, started, status, "".join(parts), None, status)
                raise
            finally:
                helpers.cancel_scope.cancel()
        coalescer.flush()
        text = "".join(parts)
        # The stream is over: its outcome is written even if a cancel arrives now.
        with trio.CancelScope(shield=True), trio.move_on_after(_FINAL_WRITE_TIMEOUT_S):
            if call.completion is not None:
                completion = call.completion
                await self._finish(request, started, "completed", completion.text, completion, None)
            else:
                reason = call.failure.reason if call.failure is not None else "internal"
                await self._finish(request, started, "failed", text, None, reason)

    async def _call(self, started: _Started, on_text: OnText, call: _Call) -> None:
        """The provider call of one reply (a child of ``_generate``): its outcome in ``call``."""
        try:
            call.completion = await self.llm.stream_chat(
                started.prompt.messages,
                max_tokens=self.settings.llm_max_reply_tokens,
                on_text=on_text,
            )
        except LLMError as exc:
            call.failure = exc
        except Exception:  # a bug must still settle the reply (Cancelled is no Exception)
            log.exception("assistant.internal_error")
        call.done.set()

    async def _start_when_free(
        self, reply: _Reply, launch: Callable[[_Started], None]
    ) -> _Started | None:
        """``_start``, waiting while the thread's reply is being generated on another node."""
        while True:
            try:
                return await self._start(reply.request, launch=launch)
            except _ThreadBusy:
                if self._closing:  # shutting down: it would wait past the drain
                    self._refuse_soon(reply.request, "unavailable")
                    return None
                if self._behind_started(reply.request):
                    return None  # the reply streaming is one queued here: it runs first
                await self._wait_for_slot(reply)

    def _behind_started(self, request: ReplyRequest) -> bool:
        """A reply its send started may be queued behind a request that has not started (the
        send raced a request queued meanwhile): the thread is then busy with it, so the request
        waiting would wait for ever. Move the started one to run next and this request after
        it (the worker drops the current entry when this returns); True if it did."""
        queue = self._queues.get(request.thread_id)
        if queue is None:
            return False
        for i, queued in enumerate(queue):
            if i > 0 and queued.started is not None:
                del queue[i]
                queue.insert(1, queued)
                queue.insert(2, request)
                return True
        return False

    async def _wait_for_slot(self, reply: _Reply) -> None:
        """Wait until the thread's reply on another node ends (or a second passes).

        Cancelled meanwhile (shutdown) the request is not lost: it gets its ``unavailable``
        refusal like any request the server could not start.
        """
        thread_id = reply.request.thread_id
        reply.waiting = True
        try:
            with trio.move_on_after(_BUSY_RECHECK_S):
                if self._broker is not None:
                    await self._broker.wait_reply_end(thread_id)
                else:
                    await trio.sleep_forever()
        except trio.Cancelled:
            if reply.stop is not None:
                self._refuse_soon(reply.request, "unavailable")
            raise
        finally:
            reply.waiting = False

    async def _start(
        self,
        request: ReplyRequest,
        refuse: str | None = None,
        launch: Callable[[_Started], None] | None = None,
    ) -> _Started | None:
        """The start transaction (see module docstring). None when refused (already recorded).

        ``refuse`` records a refusal decided before the start (queue full, shutting down).
        ``launch`` is called with the reply once its start has committed, to send the
        provider's request; the caller publishes nothing of the call until this returns.
        """
        if request.started is not None:
            return self._start_started(request, request.started, refuse, launch)
        if refuse is None and request.history is not None:
            started = await self._start_from_history(request, request.history, launch)
            if not isinstance(started, _Stale):
                return started
            # Something was written in the thread since the send read it: read it again.
        settings = self.settings
        model = self.llm.model
        refused: str | None = refuse
        async with self.services.db.transaction() as tx:
            base = await store.lock_for_reply(
                tx, request.thread_id, request.project_id, request.user_message_id
            )
            if base is None or base["asked"] is None:
                raise LookupError("thread, project or message is gone")
            if refused is None and base["streaming"] is not None:
                raise _ThreadBusy  # generated elsewhere now; rolled back, nothing written
            seq = int(base["seq"])
            turns = [Turn(role, content) for role, content in base["turns"]]
            prompt = build_prompt(settings, summary=base["summary"], turns=turns)
            try:
                check_content(settings, base["asked"])
            except ContentFiltered:
                refused = refused or "content_filtered"
            estimate = pricing.reply_estimate_usd(settings, model, prompt.tokens)
            whole = prompt.turns_included == len(turns) < store.HISTORY_LIMIT

            launched: list[_Started] = []

            def decided(result: tuple[str, str]) -> None:
                # The reply is written, the COMMIT on its way (launched below, once it is in).
                outcome, message = result
                if outcome == "started":
                    launched.append(_Started(json.loads(message), prompt, model, whole))

            # Budgeted projects lock their row from this statement's budget check to its
            # COMMIT, which follows in the same trip: unlimited ones run in parallel.
            outcome, message_json = await store.insert_reply_and_commit(
                tx,
                thread_id=request.thread_id,
                project_id=request.project_id,
                seq=seq,
                reply_to=request.user_message_id,
                model=model,
                reserve_usd=estimate,
                claimed_by=self.incarnation,
                refuse=refused,
                refuse_text=None if refused is None else self._failure_text(refused),
                budget_text=self._failure_text("budget_exceeded"),
                before_commit=decided,
            )
        if launched:
            self._publish(request.thread_id, "message.created", seq, launched[0].message)
            if launch is not None:  # committed: the provider may be called (and bill)
                launch(launched[0])
            return launched[0]
        self._refused(request, seq, outcome, json.loads(message_json))
        return None

    async def _start_from_history(
        self,
        request: ReplyRequest,
        history: ReplyHistory,
        launch: Callable[[_Started], None] | None,
    ) -> _Started | _Stale | None:
        """The start from what the send read (``request.history``): one statement and its
        COMMIT in one trip (``tl_start_reply``), then the provider's request. ``_STALE`` if
        something was written in the thread since the send (nothing written: start the usual
        way); ``_ThreadBusy`` and ``LookupError`` as ``_start``."""
        settings = self.settings
        model = self.llm.model
        turns = [Turn(role, content) for role, content in history.turns]
        prompt = build_prompt(settings, summary=history.summary, turns=turns)
        refused: str | None = None
        try:
            check_content(settings, history.asked)
        except ContentFiltered:
            refused = "content_filtered"
        outcome, message_json = await store.start_reply(
            self.services.db.atomic,
            thread_id=request.thread_id,
            project_id=request.project_id,
            seq=history.seq,
            reply_to=request.user_message_id,
            model=model,
            reserve_usd=pricing.reply_estimate_usd(settings, model, prompt.tokens),
            claimed_by=self.incarnation,
            refuse=refused,
            refuse_text=None if refused is None else self._failure_text(refused),
            budget_text=self._failure_text("budget_exceeded"),
        )
        if outcome == "stale":
            return _STALE
        if outcome == "busy":
            raise _ThreadBusy  # generated elsewhere now; nothing written
        if outcome == "not_found" or message_json is None:
            raise LookupError("thread or project is gone")
        message = json.loads(message_json)
        if outcome != "started":
            self._refused(request, history.seq, outcome, message)
            return None
        whole = prompt.turns_included == len(turns) < store.HISTORY_LIMIT
        started = _Started(message, prompt, model, whole)
        self._publish(request.thread_id, "message.created", history.seq, message)
        # Committed already: the provider's first token never waits for this start's COMMIT.
        if launch is not None:
            launch(started)
        return started

    def _start_started(
        self,
        request: ReplyRequest,
        reply: StartedReply,
        refuse: str | None,
        launch: Callable[[_Started], None] | None,
    ) -> _Started | None:
        """A reply its send started (``tl_send_and_start``): build the prompt from the turns
        the statement chose and launch the provider's request (nothing else to write).

        The prompt must not cost more than what was reserved: built from the same turns it
        counts the same unless a setting changed under a stored count (``max_message_chars``);
        then it is rebuilt within the reserved count (older turns left out), and logged."""
        settings = self.settings
        model = self.llm.model
        if refuse is not None:
            # Refused after it was written (shutting down, queue full): it ends ``failed``.
            nothing = Prompt(messages=[], tokens=0, turns_included=0, summary_used=False)
            return _Started(reply.message, nothing, model, refused=refuse)
        turns = [Turn(role, content) for role, content in reply.turns]
        prompt = build_prompt(settings, summary=reply.summary, turns=turns)
        if prompt.tokens != reply.prompt_tokens or prompt.turns_included != len(turns):
            log.warning(
                "assistant.prompt_count_mismatch",
                counted=prompt.tokens,
                reserved_for=reply.prompt_tokens,
                turns=len(turns),
                included=prompt.turns_included,
            )
            if prompt.tokens > reply.prompt_tokens:
                prompt = build_prompt(
                    settings, summary=reply.summary, turns=turns, budget=reply.prompt_tokens
                )
        started = _Started(reply.message, prompt, model, reply.whole)
        if launch is not None:
            launch(started)
        return started

    def _refused(
        self, request: ReplyRequest, seq: int, reason: str, message: dict[str, Any]
    ) -> None:
        """Publish a refused start's two events (written by its statement)."""
        self._publish(request.thread_id, "message.created", seq, message)
        data = self._failed_payload(message["id"], "", "failed", reason)
        self._publish(request.thread_id, "assistant.failed", seq + 1, data)
        # No provider call was made, so threadline_llm_requests_total is not touched.
        log.info("assistant.refused", thread_id=request.thread_id, reason=reason)

    async def _save_periodically(self, message_id: str, parts: list[str]) -> None:
        saved = 0
        while True:
            await trio.sleep(self.save_interval_s)
            if len(parts) == saved:
                continue
            saved = len(parts)
            # Shielded (briefly) so the reply's end never cuts a save short, which would cost
            # the pool a connection.
            with trio.CancelScope(shield=True), trio.move_on_after(_FINAL_WRITE_TIMEOUT_S):
                await store.save_progress(self.services.db.atomic, message_id, "".join(parts))

    async def _finish(
        self,
        request: ReplyRequest,
        started: _Started,
        status: str,
        text: str,
        completion: Completion | None,
        reason: str | None,
    ) -> None:
        """The finish transaction; publishes the closing event after commit."""
        message_id = started.message["id"]
        model = completion.model if completion is not None else started.model
        usage: Usage | None = completion.usage if completion is not None else None
        if usage is None and (text or completion is not None):
            usage = Usage(
                prompt_tokens=started.prompt.tokens,
                completion_tokens=tokens.count_text(text),
                estimated=True,
            )
        cost = Decimal(0)
        usage_data: dict[str, Any] | None = None
        if usage is not None:
            cost = pricing.cost_usd(
                self.settings, model, usage.prompt_tokens, usage.completion_tokens
            )
            usage_data = {
                "model": model,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cost_usd": float(cost),
                "estimated": usage.estimated,
            }
        if status in ("completed", "cancelled"):
            type_ = "assistant.completed"
            data: dict[str, Any] = {
                "message_id": message_id,
                "content": text,
                "status": status,
                "usage": usage_data,
            }
            if status == "cancelled":
                data["cancelled"] = True
        else:
            type_ = "assistant.failed"
            data = self._failed_payload(message_id, text, status, reason or "internal")
            data["usage"] = usage_data
        # One statement and its COMMIT, in one trip: the thread row is held only while the
        # database runs them, never while this event loop is busy elsewhere.
        finished = await store.finish_reply(
            self.services.db.atomic,
            thread_id=request.thread_id,
            project_id=request.project_id,
            message_id=message_id,
            status=status,
            content=text,
            # Stored with the text: the thread's next send can start its reply in one statement.
            content_tokens=message_tokens(self.settings, text),
            model=model,
            event_type=type_,
            payload=data,
            usage=None
            if usage is None  # spent either way: counted even if the claim was lost
            else store.UsageRow(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost_usd=cost,
                estimated=usage.estimated,
            ),
        )
        if finished is not None:
            self._publish(request.thread_id, type_, finished[0], data)
        else:
            # Another node took this one for dead (its heartbeat stalled) and ended the reply
            # as interrupted: that closing event stands, no second one is written.
            log.warning("assistant.claim_lost", thread_id=request.thread_id, status=status)
        if usage is not None:
            metrics.LLM_TOKENS.labels(kind="prompt").inc(usage.prompt_tokens)
            metrics.LLM_TOKENS.labels(kind="completion").inc(usage.completion_tokens)
            metrics.LLM_COST.inc(float(cost))
        log.info(
            "assistant.finished",
            thread_id=request.thread_id,
            message_id=message_id,
            status=status,
            reason=reason,
            chars=len(text),
        )
        if status == "completed" and self._on_completed is not None:
            # When the prompt carried everything since the latest summary, its size plus the
            # answer bounds what the summariser would count: below the threshold, the poke
            # (and its database round trips) would only end in "skipped".
            small = (
                started.whole_history
                and usage is not None
                and usage.prompt_tokens + usage.completion_tokens
                < self.settings.summary_threshold_tokens
            )
            if not small:
                self._on_completed(request.thread_id)

    @staticmethod
    def _failure_text(reason: str) -> str:
        return _FAILURE_TEXT.get(reason, _FAILURE_TEXT["internal"])

    @classmethod
    def _failed_payload(
        cls, message_id: str, content: str, status: str, reason: str
    ) -> dict[str, Any]:
        return {
            "message_id": message_id,
            "content": content,
            "status": status,
            "reason": reason,
            "message": cls._failure_text(reason),
        }

    def _publish(self, thread_id: str, type_: str, seq: int | None, data: dict[str, Any]) -> None:
        self.services.publish(ThreadEvent(thread_id=thread_id, type=type_, seq=seq, data=data))
