"""Domain events handed on after commit, and the hook that carries them to the actors.

Command handlers collect ``ThreadEvent``s inside their unit of work; only after the transaction
commits does the dispatcher call ``Services.publish`` for each one. Durable events (``seq`` set)
are already in the ``thread_events`` log when published, so a receiver that misses one can
always catch up from the database; ephemeral ones (``seq`` None) are best-effort by design.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

DURABLE_TYPES = frozenset(
    {
        "message.created",
        "message.updated",
        "message.deleted",
        "assistant.completed",
        "assistant.failed",
        "thread.summarized",
    }
)
EPHEMERAL_TYPES = frozenset({"assistant.started", "assistant.delta"})


@dataclass(frozen=True, slots=True)
class ThreadEvent:
    """One event of one thread, as subscribers will see it (``data`` is the wire payload)."""

    thread_id: str
    type: str
    seq: int | None
    data: dict[str, Any]
    # trio.current_time() when the event was committed; delivery latency is measured from here.
    committed_at: float = field(default_factory=trio.current_time)
    # The node (incarnation) that published an ephemeral event, when it is not this one.
    origin: str | None = None

    def wire(self) -> dict[str, Any]:
        """The contract's event frame."""
        return {
            "op": "event",
            "thread_id": self.thread_id,
            "type": self.type,
            "seq": self.seq,
            "data": self.data,
        }


Publish = Callable[[ThreadEvent], None]


def drop_event(event: ThreadEvent) -> None:
    """The publish hook before any actor system is attached: events stay in the log only."""
