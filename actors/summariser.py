"""The summariser actor: condenses the oldest unsummarised part of long threads.

State: a bounded mailbox of thread ids (``MAILBOX_SIZE``; overflow: the poke is dropped and
logged, the thread is poked again after its next completed reply) and the set of threads already
waiting in it (a thread is queued once however often it is poked). It wakes only when poked by
the assistant after a completed reply: no timers, no polling.

For a poked thread: if the finished messages after its latest summary pass
``summary_threshold_tokens``, it summarises the oldest of them (leaving about half the threshold
of recent messages verbatim), folding the previous summary in, so the newest summary always
covers the thread from its start to ``end_seq``. The model call happens outside any transaction;
all writes (summary row + ``thread.summarized`` event) happen in one transaction at the end,
under a per-thread lock and a UNIQUE window, so two summarisers (two nodes) produce one summary
and a cancellation at any point leaves nothing half-written.

Summaries are charged like replies: their cost is stored with the summary and counts in the
project's usage and monthly spend. A project whose budget cannot cover a summary's worst case is
not summarised (outcome ``skipped``, no provider call).

It reaches storage and the model through two protocols, ``SummaryStore`` and ``SummaryModel``
(implemented in ``server/llm/summaries.py``); this package never imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import structlog
import trio

from server import metrics
from server.config import Settings
from server.events import ThreadEvent

log = structlog.get_logger(__name__)

MAILBOX_SIZE = 256
SUMMARY_MAX_TOKENS = 512


@dataclass(frozen=True, slots=True)
class Turn:
    """A finished user or assistant message, as the summary sees it."""

    id: str
    seq: int
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Pending:
    """What a thread has to summarise: the latest summary and the finished turns after it."""

    previous: str | None  # the latest summary's text, None without one
    after_seq: int  # the seq that summary ends at (0 without one)
    turns: list[Turn]  # oldest first; never past a reply still streaming
    budget_left: Decimal | None  # USD the project may still spend this month; None: no limit


@dataclass(frozen=True, slots=True)
class Summary:
    """A summary to store: the window it covers, its text and what it cost."""

    start: Turn
    end: Turn
    content: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    estimated: bool


@dataclass(frozen=True, slots=True)
class Written:
    """A stored summary's durable event (to publish after commit)."""

    seq: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Completion:
    """The model's answer: text, the model that wrote it, its token counts if it sent them."""

    text: str
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None


class SummaryFailed(Exception):
    """The model call failed; ``reason`` names why (``timeout``, ``provider_error``, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SummaryStore(Protocol):
    """The database side of summaries."""

    async def pending(self, thread_id: str, threshold_tokens: int) -> Pending | None:
        """What to summarise; None when a cheap bound shows the thread below the threshold."""

    async def save(self, thread_id: str, after_seq: int, summary: Summary) -> Written | str:
        """Store the summary and its ``thread.summarized`` event in one transaction, if no other
        summariser holds the thread and the latest summary still ends at ``after_seq``; the
        reason it was not stored otherwise (``locked``, ``superseded``, ``exists``)."""


class SummaryModel(Protocol):
    """The language model side of summaries: prompts, token counts, prices and the call."""

    @property
    def model(self) -> str:
        """The model a summary is asked of."""

    def count(self, text: str) -> int:
        """Tokens of ``text``."""

    def overhead(self, previous: str | None) -> int:
        """Tokens of the instruction and the previous summary in a prompt."""

    def prompt_tokens(self, previous: str | None, window: list[Turn]) -> int:
        """Tokens of the whole prompt for ``window``."""

    def cost_usd(self, model: str, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """What that many tokens of ``model`` cost."""

    async def summarise(
        self, previous: str | None, window: list[Turn], max_tokens: int
    ) -> Completion:
        """Ask the model; ``SummaryFailed`` when it fails."""


class Summariser:
    """See the module docstring. Start ``run()`` in the owner's nursery; ``poke()`` it."""

    def __init__(
        self,
        store: SummaryStore,
        model: SummaryModel,
        settings: Settings,
        publish: Callable[[ThreadEvent], None],
        *,
        mailbox_size: int = MAILBOX_SIZE,
    ) -> None:
        self._store = store
        self._model = model
        self._settings = settings
        self._publish = publish
        self._send, self._receive = trio.open_memory_channel[str](mailbox_size)
        self._queued: set[str] = set()

    def poke(self, thread_id: str) -> None:
        """Ask for ``thread_id`` to be looked at. Never blocks; drops the poke if full."""
        if thread_id in self._queued:
            return
        try:
            self._send.send_nowait(thread_id)
        except trio.WouldBlock:
            log.warning("summary.mailbox_full", thread_id=thread_id)
            metrics.SUMMARIES.labels(outcome="dropped").inc()
            return
        self._queued.add(thread_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Handle pokes until cancelled. A failure on one thread is logged, never fatal."""
        task_status.started()
        while True:
            thread_id = await self._receive.receive()
            self._queued.discard(thread_id)
            try:
                await self.summarise(thread_id)
            except Exception:  # one thread's failure must not stop the actor
                log.exception("summary.error", thread_id=thread_id)
                metrics.SUMMARIES.labels(outcome="failed").inc()

    async def summarise(self, thread_id: str) -> str:
        """Summarise ``thread_id`` if it needs it; returns the outcome: ok, skipped or failed."""
        threshold = self._settings.summary_threshold_tokens
        pending = await self._store.pending(thread_id, threshold)
        if pending is None:
            return self._outcome("skipped", thread_id, why="below_threshold")
        model = self._model
        sizes = [model.count(turn.content) + 4 for turn in pending.turns]
        if sum(sizes) < threshold:
            return self._outcome("skipped", thread_id, why="below_threshold")
        window = self._window(pending, sizes)
        if not window:
            return self._outcome("skipped", thread_id, why="nothing_fits")
        prompt_tokens = model.prompt_tokens(pending.previous, window)
        worst_case = model.cost_usd(model.model, prompt_tokens, SUMMARY_MAX_TOKENS)
        if pending.budget_left is not None and pending.budget_left < worst_case:
            return self._outcome("skipped", thread_id, why="budget_exceeded")
        try:
            completion = await model.summarise(pending.previous, window, SUMMARY_MAX_TOKENS)
        except SummaryFailed as exc:
            return self._outcome("failed", thread_id, why=exc.reason)
        content = completion.text.strip()
        if not content:
            return self._outcome("failed", thread_id, why="empty_summary")
        estimated = completion.prompt_tokens is None or completion.completion_tokens is None
        used_prompt = (
            prompt_tokens if completion.prompt_tokens is None else completion.prompt_tokens
        )
        used_completion = (
            model.count(content)
            if completion.completion_tokens is None
            else completion.completion_tokens
        )
        summary = Summary(
            start=window[0],
            end=window[-1],
            content=content,
            model=completion.model,
            prompt_tokens=used_prompt,
            completion_tokens=used_completion,
            cost_usd=model.cost_usd(completion.model, used_prompt, used_completion),
            estimated=estimated,
        )
        written = await self._store.save(thread_id, pending.after_seq, summary)
        if isinstance(written, str):
            return self._outcome("skipped", thread_id, why=written)
        self._publish(
            ThreadEvent(
                thread_id=thread_id, type="thread.summarized", seq=written.seq, data=written.data
            )
        )
        return self._outcome("ok", thread_id, why=None, end_seq=written.data["end_seq"])

    def _window(self, pending: Pending, sizes: list[int]) -> list[Turn]:
        """The oldest turns to summarise: leave ~half the threshold verbatim, fit the context."""
        turns = pending.turns
        keep = self._settings.summary_threshold_tokens // 2
        tail = 0
        cut = len(turns)
        while cut > 1 and tail + sizes[cut - 1] <= keep:
            cut -= 1
            tail += sizes[cut]
        room = self._settings.llm_context_tokens - SUMMARY_MAX_TOKENS - 200
        room -= self._model.overhead(pending.previous)
        window: list[Turn] = []
        used = 0
        for turn, size in zip(turns[:cut], sizes[:cut], strict=True):
            if used + size > room:
                break
            window.append(turn)
            used += size
        return window

    @staticmethod
    def _outcome(outcome: str, thread_id: str, *, why: str | None, **fields: Any) -> str:
        metrics.SUMMARIES.labels(outcome=outcome).inc()
        log.info("summary." + outcome, thread_id=thread_id, why=why, **fields)
        return outcome
