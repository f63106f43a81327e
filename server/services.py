"""The process-wide services a request handler may use, built once by the runtime."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import trio

from server.authcache import TokenCache
from server.config import Settings
from server.db import Database
from server.events import Publish, drop_event
from server.ratelimit import RateLimiter


@dataclass(frozen=True, slots=True)
class ReplyHistory:
    """What a reply's prompt is built from, read by the send that asked for it (under the
    thread lock, ``tl_send_message``): the reply goes at ``seq`` if nothing is written before."""

    seq: int  # the reply's seq: the send's + 1
    asked: str  # the content of the message answered
    summary: str | None  # the latest summary
    turns: list[tuple[str, str]]  # (role, content) after the summary, newest first


@dataclass(frozen=True, slots=True)
class StartedReply:
    """A reply its send started in the same statement (``tl_send_and_start``): written,
    reserved and committed; what is left is the provider's request."""

    seq: int  # the reply's seq: the send's + 1
    message: dict[str, Any]  # the assistant message (``message_to_dict``'s)
    summary: str | None  # the summary in the prompt
    turns: list[tuple[str, str]]  # (role, content) of the turns that fit, newest first
    prompt_tokens: int  # the prompt's tokens as the database counted them (reserved for)
    whole: bool  # every turn since the summary fits (none left out)


@dataclass(frozen=True, slots=True)
class ReplyStart:
    """What ``tl_send_and_start`` needs to start a reply in the send's statement (given by the
    assistant: its model, claim, prices and the prompt's fixed costs)."""

    tokens: int  # the sent message's ``content_tokens``
    start: bool  # start the reply in the statement (False: the thread has requests queued here)
    head_tokens: int
    summary_overhead: int
    user_overhead: int
    assistant_overhead: int
    prompt_budget: int
    price_prompt: Decimal
    price_completion: Decimal
    max_reply: int
    model: str
    claimed_by: str | None
    refuse: str | None  # decided before (content_filtered)
    refuse_text: str | None
    budget_text: str


@dataclass(frozen=True, slots=True)
class ReplyRequest:
    """Ask the assistant to answer ``user_message_id`` in ``thread_id`` (after its commit)."""

    thread_id: str
    project_id: str
    user_message_id: str
    requested_by: str  # user id
    # Read by the send (None: the start reads it itself); see ``ReplyHistory``.
    history: ReplyHistory | None = None
    # Started by the send (``StartedReply``): only the provider's request is left.
    started: StartedReply | None = None


class Assistant(Protocol):
    """What the command bus and the WebSocket transport need of the assistant subsystem."""

    def start_reply(self, request: ReplyRequest) -> None:
        """Begin generating a reply; never blocks (the work runs under the thread's actor)."""

    async def cancel(self, thread_id: str) -> bool:
        """Stop the reply being generated in ``thread_id``; True if one was running."""


@dataclass
class Services:
    """Everything the transports need, owned by the runtime (not by the web framework).

    Subsystems fill in their hooks when they start (see ``server.runtime.PLUGINS``):
    ``publish`` is replaced by the actor hub; ``extras`` holds components that report health
    (``"llm"``, ``"supervisor"``), extra blueprints (``"blueprints"``) and ``"shutdown_hooks"``.
    """

    settings: Settings
    db: Database
    head_revision: str
    draining: trio.Event = field(default_factory=trio.Event)
    publish: Publish = drop_event
    assistant: Assistant | None = None
    # The actor system (actors.hub.Hub once attached); typed loosely so server/ need not import it.
    actors: Any = None
    shutdown_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    # One per process, shared by HTTP and WebSocket (per-user and per-IP token buckets).
    limiter: RateLimiter = field(init=False)
    # Verified access tokens and known revocations (kept fresh by ``server.auth.auth_plugin``).
    tokens: TokenCache = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter.from_settings(self.settings)
        self.tokens = TokenCache(bound_s=self.settings.auth_revocation_bound_s)
