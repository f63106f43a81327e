"""``tl_send_message`` and ``tl_message_json`` (migration 0006): a send in one statement keeps
every invariant the multi-statement send kept, and its JSON is ``message_to_dict``'s."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from server.commands.serialize import message_to_dict
from server.db import Database
from server.storage import messages


async def _owned_thread(db: Database, budget: float | None = None) -> tuple[str, str, str]:
    user = await db.fetchval(
        "INSERT INTO users (email, password_hash) VALUES ($1, 'x') RETURNING id::text",
        f"s{uuid.uuid4().hex[:10]}@example.com",
    )
    project = await db.fetchval(
        "INSERT INTO projects (owner_id, name, monthly_budget_usd) VALUES ($1, 'p', $2)"
        " RETURNING id::text",
        user,
        budget,
    )
    thread = await db.fetchval(
        "INSERT INTO threads (project_id, title) VALUES ($1, 't') RETURNING id::text", project
    )
    return user, project, thread


async def _send(
    db: Database, user: str, thread: str, content: str, cmid: str | None, reply: bool = False
) -> Any:
    return await messages.send(
        db.atomic,
        author_id=user,
        thread_id=thread,
        content=content,
        client_msg_id=cmid,
        reply=reply,
    )


async def test_send_writes_the_message_and_its_event_with_the_same_payload(db: Database) -> None:
    user, project, thread = await _owned_thread(db)
    row = await _send(db, user, thread, "hello", "c-1")
    assert row["outcome"] == "created" and str(row["project_id"]) == project and row["seq"] == 1
    sent = json.loads(row["message"])
    stored = await db.fetchrow(
        f"SELECT {messages.COLUMNS} FROM messages m WHERE m.id = $1", sent["id"]
    )
    assert sent == message_to_dict(stored)
    assert list(sent) == list(message_to_dict(stored)), "same keys in the same order"
    event = await db.fetchrow(
        "SELECT type, payload FROM thread_events WHERE thread_id = $1 AND seq = 1", thread
    )
    assert event["type"] == "message.created" and event["payload"] == sent
    counters = await db.fetchrow(
        "SELECT last_seq, message_count, last_message_at FROM threads WHERE id = $1", thread
    )
    assert (counters["last_seq"], counters["message_count"]) == (1, 1)
    assert counters["last_message_at"] == stored["created_at"]


async def test_replay_conflict_and_strangers(db: Database) -> None:
    user, _, thread = await _owned_thread(db)
    stranger, _, _ = await _owned_thread(db)
    first = await _send(db, user, thread, "same", "c-1")
    again = await _send(db, user, thread, "same", "c-1")
    assert again["outcome"] == "existing" and again["message"] == first["message"]
    assert (await _send(db, user, thread, "other", "c-1"))["outcome"] == "conflict"
    # Edited since: the replay compares with what was sent, not with the edit.
    message_id = json.loads(first["message"])["id"]
    await db.fetchval(
        "UPDATE messages SET content = 'edited', version = 2 WHERE id = $1", message_id
    )
    assert (await _send(db, user, thread, "same", "c-1"))["outcome"] == "existing"
    assert (await _send(db, user, thread, "edited", "c-1"))["outcome"] == "conflict"
    assert (await _send(db, stranger, thread, "x", "c-2"))["outcome"] == "not_found"
    assert (await _send(db, user, str(uuid.uuid4()), "x", None))["outcome"] == "not_found"
    assert await db.fetchval("SELECT last_seq FROM threads WHERE id = $1", thread) == 1


async def test_budget_checked_only_for_replies_and_nothing_written(db: Database) -> None:
    user, project, thread = await _owned_thread(db, budget=1.0)
    await _send(db, user, thread, "first", None)
    reply_to = await db.fetchval("SELECT id FROM messages WHERE thread_id = $1", thread)
    await db.fetchval(
        "INSERT INTO budget_reservations (message_id, project_id, amount_usd) VALUES ($1, $2, 1.5)",
        reply_to,
        project,
    )
    refused = await _send(db, user, thread, "answer me", "c-9", reply=True)
    assert refused["outcome"] == "budget_exceeded"
    assert (float(refused["budget"]), float(refused["spent"])) == (1.0, 1.5)
    assert await db.fetchval("SELECT last_seq FROM threads WHERE id = $1", thread) == 1
    assert (await _send(db, user, thread, "no reply wanted", "c-9"))["outcome"] == "created"
    spend = await db.fetchval("SELECT tl_project_spend($1)", project)
    assert float(spend) == 1.5


async def test_concurrent_sends_to_one_thread_take_gap_free_seqs(db: Database) -> None:
    user, _, thread = await _owned_thread(db)
    outcomes: list[str] = []

    async def send(i: int) -> None:
        row = await _send(db, user, thread, f"m{i}", f"c-{i % 15}")  # some ids twice
        outcomes.append(row["outcome"])

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(send, i)
    created = outcomes.count("created")
    assert created == 15 and outcomes.count("conflict") == 15
    seqs = [
        r["seq"]
        for r in await db.fetch(
            "SELECT seq FROM thread_events WHERE thread_id = $1 ORDER BY seq", thread
        )
    ]
    assert seqs == list(range(1, created + 1))
    mseqs = await db.fetch("SELECT seq FROM messages WHERE thread_id = $1 ORDER BY seq", thread)
    assert [r["seq"] for r in mseqs] == seqs


@pytest.mark.parametrize(
    "created_at",
    [
        datetime(2026, 11, 29, 5, 13, 24, 123456, tzinfo=UTC),
        datetime(2026, 11, 29, 5, 13, 24, tzinfo=UTC),  # no microseconds: isoformat drops them
        datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=UTC),
    ],
)
async def test_message_json_is_message_to_dict(db: Database, created_at: datetime) -> None:
    user, _, thread = await _owned_thread(db)
    row = await _send(db, user, thread, "x", None)
    message_id = json.loads(row["message"])["id"]
    await db.fetchval(
        "UPDATE messages SET created_at = $2, content = 'é\"\\n', version = 2 WHERE id = $1",
        message_id,
        created_at,
    )
    deleted = await _send(db, user, thread, "to be deleted", None)
    await db.fetchval(
        "UPDATE messages SET content = '', version = 2, deleted_at = clock_timestamp()"
        " WHERE id = $1",
        json.loads(deleted["message"])["id"],
    )
    async with db.transaction() as tx:
        await tx.execute(
            "INSERT INTO messages (thread_id, seq, role, content, status, reply_to, model)"
            " VALUES ($1, 3, 'assistant', 'a', 'streaming', $2, 'gpt')",
            thread,
            message_id,
        )
        await tx.execute(
            "INSERT INTO thread_events (thread_id, seq, type, payload)"
            " VALUES ($1, 3, 'message.created', '{}')",
            thread,
        )
    rows = await db.fetch(
        f"SELECT {messages.COLUMNS}, tl_message_json(m)::text AS js FROM messages m"
        " WHERE m.thread_id = $1 ORDER BY m.seq",
        thread,
    )
    assert len(rows) == 3
    for r in rows:
        assert json.loads(r["js"]) == message_to_dict(r)
