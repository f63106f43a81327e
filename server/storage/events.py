"""SQL for reading the durable event log (``thread_events``) and checking who may subscribe.

The log's ``payload`` column holds the event's wire ``data`` exactly as it was published.
Seqs are gap-free per thread (see the schema's trigger), so a range read returns every seq in it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from actors.thread import Inflight, ThreadStart
from server.db import Database
from server.events import ThreadEvent

log = structlog.get_logger(__name__)

# Asks the node generating a reply for its text so far: (thread_id, message_id, owner) ->
# {"text", "next_index"}, {} if it is not generating it (any more), None without an answer.
Snapshots = Callable[[str, str, str | None], Awaitable[Any]]


class EventLog:
    """``actors.thread.EventLog`` over the database: one short read-only statement per call."""

    def __init__(self, db: Database, snapshots: Snapshots | None = None) -> None:
        self._db = db
        self._snapshots = snapshots

    async def start(self, thread_id: str) -> ThreadStart:
        """The last seq and the replies being generated (one statement; then, only if one is
        streaming, a question to the node generating it)."""
        rows = await self._db.fetch(
            """SELECT t.last_seq, m.id, m.claimed_by, m.content FROM threads t
                 LEFT JOIN messages m ON m.thread_id = t.id AND m.status = 'streaming'
                WHERE t.id = $1""",
            thread_id,
        )
        if not rows:
            return ThreadStart(last_seq=0)
        inflight = [await self._inflight(thread_id, row) for row in rows if row["id"] is not None]
        return ThreadStart(last_seq=int(rows[0]["last_seq"]), inflight=inflight)

    async def _inflight(self, thread_id: str, row: Any) -> Inflight:
        message_id = str(row["id"])
        owner = str(row["claimed_by"]) if row["claimed_by"] is not None else None
        answer = None
        if self._snapshots is not None:
            answer = await self._snapshots(thread_id, message_id, owner)
        if isinstance(answer, dict) and isinstance(answer.get("next_index"), int):
            return Inflight(message_id, str(answer.get("text", "")), answer["next_index"])
        # No answer in time: the text saved last (at most a couple of seconds old).
        log.info("thread.snapshot_unavailable", thread_id=thread_id, message_id=message_id)
        return Inflight(message_id, str(row["content"]), None)

    async def last_seq(self, thread_id: str) -> int:
        """The thread's last committed seq; 0 for a thread without events (or none at all)."""
        value = await self._db.fetchval("SELECT last_seq FROM threads WHERE id = $1", thread_id)
        return int(value) if value is not None else 0

    async def last_seqs(self, thread_ids: list[str]) -> dict[str, int]:
        """The last committed seq of each of these threads (one statement)."""
        rows = await self._db.fetch(
            "SELECT id::text AS id, last_seq FROM threads WHERE id = ANY($1::uuid[])", thread_ids
        )
        return {row["id"]: int(row["last_seq"]) for row in rows}

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
