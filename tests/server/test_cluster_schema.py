"""The cluster's invariants live in the schema: one streaming reply per thread, one reply per
message, one claim per reply."""

from __future__ import annotations

import uuid

import asyncpg
import psycopg
import pytest

from server import migrate
from server.db import Database
from tests.server.test_schema_invariants import add_message, fresh, new_thread

__all__ = ["fresh"]


async def test_one_streaming_reply_per_thread_and_one_reply_per_message(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        asked = await add_message(tx, thread)
        await add_message(tx, thread, role="assistant", status="streaming", reply_to=asked)
    with pytest.raises(asyncpg.UniqueViolationError, match="messages_one_streaming_reply"):
        async with fresh.transaction() as tx:
            other = await add_message(tx, thread)
            await add_message(tx, thread, role="assistant", status="streaming", reply_to=other)
    with pytest.raises(asyncpg.UniqueViolationError, match="messages_one_reply_per_message"):
        async with fresh.transaction() as tx:
            await add_message(tx, thread, role="assistant", status="failed", reply_to=asked)
    with pytest.raises(asyncpg.CheckViolationError, match="messages_claim_is_a_reply"):
        async with fresh.transaction() as tx:
            await add_message(tx, thread, claimed_by=uuid.uuid4())


def test_the_claims_migration_ends_duplicate_streaming_replies(scratch_dsn: str) -> None:
    """Before claims, a crash and a restart could leave two streaming replies in a thread; the
    migration keeps the newest and ends the others, each with its closing event."""
    migrate.upgrade(scratch_dsn, "0007")
    with psycopg.connect(scratch_dsn) as conn:
        thread = conn.execute(
            """WITH u AS (INSERT INTO users (email, password_hash)
                          VALUES ('m@example.com', 'x') RETURNING id),
                    p AS (INSERT INTO projects (owner_id, name) SELECT id, 'p' FROM u RETURNING id)
               INSERT INTO threads (project_id, title) SELECT id, 't' FROM p RETURNING id"""
        ).fetchone()
        assert thread is not None
        for seq, content in ((1, "old"), (2, "new")):
            conn.execute(
                """INSERT INTO messages (thread_id, seq, role, content, status)
                   VALUES (%s, %s, 'assistant', %s, 'streaming')""",
                (thread[0], seq, content),
            )
            conn.execute(
                """INSERT INTO thread_events (thread_id, seq, type, payload)
                   VALUES (%s, %s, 'message.created', '{}')""",
                (thread[0], seq),
            )
        conn.commit()
    migrate.upgrade(scratch_dsn)
    with psycopg.connect(scratch_dsn) as conn:
        statuses = conn.execute(
            "SELECT content, status FROM messages WHERE thread_id = %s ORDER BY seq", (thread[0],)
        ).fetchall()
        events = conn.execute(
            "SELECT seq, type, payload FROM thread_events WHERE thread_id = %s ORDER BY seq",
            (thread[0],),
        ).fetchall()
    assert statuses == [("old", "interrupted"), ("new", "streaming")]
    assert [(seq, type_) for seq, type_, _ in events][-1] == (3, "assistant.failed")
    assert events[-1][2]["reason"] == "interrupted" and events[-1][2]["content"] == "old"
    migrate.downgrade(scratch_dsn, "0007")  # and back
