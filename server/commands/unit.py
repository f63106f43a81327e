"""The unit of work a command handler runs in, and what it returns."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.db import Tx
from server.errors import NotFound
from server.principal import Principal
from server.services import Services
from server.storage import threads


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command produced: the resource (or None) and whether it was newly created.

    ``data`` is the JSON-ready resource, identical over REST and WebSocket; ``created`` tells
    REST to answer 201 rather than 200 (an idempotent replay of a send is ``created=False``).
    """

    data: dict[str, Any] | None
    created: bool = False


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A durable event written in the transaction, to be published after commit."""

    thread_id: str
    type: str
    seq: int
    data: dict[str, Any]


@dataclass
class CommandContext:
    """One open transaction plus what to do once it commits."""

    services: Services
    principal: Principal
    tx: Tx
    events: list[PendingEvent] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)

    @property
    def user_id(self) -> str:
        return self.principal.user_id

    async def emit(self, thread_id: str, type_: str, seq: int, data: dict[str, Any]) -> None:
        """Write a durable event to ``thread_events`` now; publish it after commit."""
        await threads.append_event(self.tx, thread_id, seq, type_, data)
        self.written(thread_id, type_, seq, data)

    def written(self, thread_id: str, type_: str, seq: int, data: dict[str, Any]) -> None:
        """An event the handler's SQL already wrote (e.g. ``tl_send_message``): publish it after
        commit."""
        self.events.append(PendingEvent(thread_id, type_, seq, data))


def require_id(value: str) -> str:
    """A resource id as the database knows it; anything not a UUID names nothing (404)."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise NotFound("Not found.") from None
