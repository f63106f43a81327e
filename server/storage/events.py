"""SQL for reading the durable event log (``thread_events``) and checking who may subscribe.

The log's ``payload`` column holds the event's wire ``data`` exactly as it was published.
Seqs are gap-free per thread (see the schema's trigger), so a range read returns every seq in it.
"""

from __future__ import annotations

import time
import uuid

import trio

from server.db import Database
from server.events import ThreadEvent


class EventLog:
    """``actors.thread.EventLog`` over the database: one short read-only statement per call."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def last_seq(self, thread_id: str) -> int:
        """The thread's last committed seq; 0 for a thread without events (or none at all)."""
        value = await self._db.fetchval("SELECT last_seq FROM threads WHERE id = $1", thread_id)
        return int(value) if value is not None else 0

    async def read(self, thread_id: str, after_seq: int, upto_seq: int) -> list[ThreadEvent]:
        """Events with ``after_seq < seq <= upto_seq``, in seq order."""
        rows = await self._db.fetch(
            """SELECT seq, type, payload, created_at FROM thread_events
                WHERE thread_id = $1 AND seq > $2 AND seq <= $3
                ORDER BY seq""",
            thread_id,
            after_seq,
            upto_seq,
        )
        # committed_at is on trio's clock: place each event as long ago as the database says,
        # so delivery latency of re-read events is not understated.
        now, wall = trio.current_time(), time.time()
        return [
            ThreadEvent(
                thread_id=thread_id,
                type=row["type"],
                seq=row["seq"],
                data=row["payload"],
                committed_at=now - max(0.0, wall - row["created_at"].timestamp()),
            )
            for row in rows
        ]


async def thread_visible_to(db: Database, thread_id: str, user_id: str) -> bool:
    """True if ``thread_id`` exists and belongs to a project of ``user_id``.

    A malformed id is simply not visible (the caller answers 404 either way).
    """
    try:
        thread_uuid, user_uuid = uuid.UUID(thread_id), uuid.UUID(user_id)
    except ValueError:
        return False
    value = await db.fetchval(
        """SELECT true FROM threads t JOIN projects p ON p.id = t.project_id
            WHERE t.id = $1 AND p.owner_id = $2""",
        thread_uuid,
        user_uuid,
    )
    return value is True
