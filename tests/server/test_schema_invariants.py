"""Each invariant is enforced by PostgreSQL itself: direct SQL that breaks it is refused."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from server import migrate
from server.db import Database, Tx


@pytest.fixture
async def fresh(scratch_dsn: str) -> AsyncIterator[Database]:
    """A database of its own at head, so whole-table invariants can be tested."""
    migrate.upgrade(scratch_dsn)
    async with Database.connect(scratch_dsn, min_size=1, max_size=2) as database:
        yield database


async def new_user(tx: Tx, email: str | None = None) -> Any:
    return await tx.fetchval(
        "INSERT INTO users (email, password_hash) VALUES ($1, 'x') RETURNING id",
        email or f"u{uuid.uuid4().hex[:10]}@example.com",
    )


async def new_thread(tx: Tx) -> Any:
    user = await new_user(tx)
    project = await tx.fetchval(
        "INSERT INTO projects (owner_id, name) VALUES ($1, 'p') RETURNING id", user
    )
    return await tx.fetchval(
        "INSERT INTO threads (project_id, title) VALUES ($1, 't') RETURNING id", project
    )


async def add_message(tx: Tx, thread: Any, content: str = "hi", **extra: Any) -> Any:
    """Insert a message the way the application must: its message.created event at the same seq."""
    seq = await tx.fetchval("SELECT last_seq + 1 FROM threads WHERE id = $1", thread)
    columns = {"thread_id": thread, "seq": seq, "role": "user", "content": content, **extra}
    names = ", ".join(columns)
    params = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    message = await tx.fetchval(
        f"INSERT INTO messages ({names}) VALUES ({params}) RETURNING id", *columns.values()
    )
    await tx.execute(
        "INSERT INTO thread_events (thread_id, seq, type, payload) "
        "VALUES ($1, $2, 'message.created', $3)",
        thread,
        seq,
        {"id": str(message)},
    )
    return message


async def test_email_is_unique_case_insensitively(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        await new_user(tx, "Ada@Example.com")
    with pytest.raises(asyncpg.UniqueViolationError):
        async with fresh.transaction() as tx:
            await new_user(tx, "ada@example.COM")


async def test_email_must_look_like_an_address(fresh: Database) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        async with fresh.transaction() as tx:
            await new_user(tx, "not-an-address")


async def test_single_user_install_refuses_a_second_user(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        await tx.execute("UPDATE installation SET single_user = true")
        await new_user(tx)
    with pytest.raises(asyncpg.CheckViolationError, match="single-user"):
        async with fresh.transaction() as tx:
            await new_user(tx)
    async with fresh.transaction() as tx:
        assert await tx.fetchval("SELECT count(*) FROM users") == 1


async def test_installation_has_exactly_one_row(fresh: Database) -> None:
    with pytest.raises(asyncpg.PostgresError):
        async with fresh.transaction() as tx:
            await tx.execute("INSERT INTO installation (id) VALUES (false)")
    with pytest.raises(asyncpg.UniqueViolationError):
        async with fresh.transaction() as tx:
            await tx.execute("INSERT INTO installation (id) VALUES (true)")


async def test_project_budget_cannot_be_negative(fresh: Database) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        async with fresh.transaction() as tx:
            user = await new_user(tx)
            await tx.execute(
                "INSERT INTO projects (owner_id, name, monthly_budget_usd) VALUES ($1, 'p', -1)",
                user,
            )


async def test_event_seqs_are_gap_free_and_kept_on_the_thread(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        await add_message(tx, thread)
        await add_message(tx, thread)
    async with fresh.transaction() as tx:
        assert await tx.fetchval("SELECT last_seq FROM threads WHERE id = $1", thread) == 2
    with pytest.raises(asyncpg.CheckViolationError, match="next seq"):
        async with fresh.transaction() as tx:
            await tx.execute(
                "INSERT INTO thread_events (thread_id, seq, type, payload) "
                "VALUES ($1, 4, 'thread.summarized', '{}')",
                thread,
            )
    with pytest.raises(asyncpg.CheckViolationError):
        async with fresh.transaction() as tx:  # an old seq again
            await tx.execute(
                "INSERT INTO thread_events (thread_id, seq, type, payload) "
                "VALUES ($1, 2, 'thread.summarized', '{}')",
                thread,
            )
    async with fresh.transaction() as tx:  # seq left out: the trigger allocates the next one
        seq = await tx.fetchval(
            "INSERT INTO thread_events (thread_id, type, payload) "
            "VALUES ($1, 'thread.summarized', '{}') RETURNING seq",
            thread,
        )
    assert seq == 3


async def test_event_log_is_append_only(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        await add_message(tx, thread)
    with pytest.raises(asyncpg.CheckViolationError, match="append-only"):
        async with fresh.transaction() as tx:
            await tx.execute("UPDATE thread_events SET payload = '{}' WHERE thread_id = $1", thread)


async def test_unknown_event_type_is_refused(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
    with pytest.raises(asyncpg.CheckViolationError):
        async with fresh.transaction() as tx:
            await tx.execute(
                "INSERT INTO thread_events (thread_id, type, payload) VALUES ($1, 'bogus', '{}')",
                thread,
            )


async def test_message_needs_its_created_event_at_the_same_seq(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match=r"message\.created"):
        async with fresh.transaction() as tx:
            await tx.execute(
                "INSERT INTO messages (thread_id, seq, role, content) VALUES ($1, 1, 'user', 'x')",
                thread,
            )


async def test_message_seq_and_client_msg_id_are_unique_per_thread(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        await add_message(tx, thread, client_msg_id="c-1")
    with pytest.raises(asyncpg.UniqueViolationError, match="client_msg_id"):
        async with fresh.transaction() as tx:
            await add_message(tx, thread, client_msg_id="c-1")
    with pytest.raises(asyncpg.UniqueViolationError, match="thread_seq"):
        async with fresh.transaction() as tx:
            await tx.execute(
                "INSERT INTO messages (thread_id, seq, role, content) VALUES ($1, 1, 'user', 'y')",
                thread,
            )


@pytest.mark.parametrize(
    ("role", "status"), [("robot", "completed"), ("user", "streaming"), ("assistant", "done")]
)
async def test_role_and_status_checks(fresh: Database, role: str, status: str) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
    with pytest.raises(asyncpg.CheckViolationError):
        async with fresh.transaction() as tx:
            await add_message(tx, thread, role=role, status=status)


async def test_counters_follow_messages(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        first = await add_message(tx, thread)
        await add_message(tx, thread)
    async with fresh.transaction() as tx:
        row = await tx.fetchrow("SELECT * FROM threads WHERE id = $1", thread)
        assert row is not None
        assert row["message_count"] == 2
        assert row["last_message_at"] is not None
        await tx.execute(
            "UPDATE messages SET deleted_at = now(), version = version + 1 WHERE id = $1", first
        )
        assert await tx.fetchval("SELECT message_count FROM threads WHERE id = $1", thread) == 1


async def test_edit_must_bump_version_by_one_and_is_audited(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        editor = await new_user(tx)
        message = await add_message(tx, thread, content="before")
    with pytest.raises(asyncpg.CheckViolationError, match="new version"):
        async with fresh.transaction() as tx:
            await tx.execute("UPDATE messages SET content = 'sneaky' WHERE id = $1", message)
    with pytest.raises(asyncpg.CheckViolationError, match="increase by one"):
        async with fresh.transaction() as tx:
            await tx.execute(
                "UPDATE messages SET content = 'x', version = 3 WHERE id = $1", message
            )
    async with fresh.transaction(actor_id=str(editor)) as tx:
        await tx.execute(
            "UPDATE messages SET content = 'after', version = 2 WHERE id = $1", message
        )
        edit = await tx.fetchrow("SELECT * FROM message_edits WHERE message_id = $1", message)
        edited_at = await tx.fetchval("SELECT edited_at FROM messages WHERE id = $1", message)
    assert edit is not None
    assert (edit["kind"], edit["old_content"], edit["new_content"], edit["version"]) == (
        "edit",
        "before",
        "after",
        2,
    )
    assert edit["editor_id"] == editor
    assert edited_at is not None


async def test_delete_is_audited_and_final(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        message = await add_message(tx, thread, content="gone soon")
    with pytest.raises(asyncpg.CheckViolationError, match="new version"):
        async with fresh.transaction() as tx:
            await tx.execute("UPDATE messages SET deleted_at = now() WHERE id = $1", message)
    async with fresh.transaction() as tx:
        await tx.execute(
            "UPDATE messages SET deleted_at = now(), version = 2 WHERE id = $1", message
        )
        kinds = await tx.fetch(
            "SELECT kind, old_content, new_content FROM message_edits WHERE message_id = $1",
            message,
        )
    assert [tuple(r) for r in kinds] == [("delete", "gone soon", None)]
    for sql in (
        "UPDATE messages SET deleted_at = NULL, version = 3 WHERE id = $1",
        "UPDATE messages SET content = 'back', version = 3 WHERE id = $1",
    ):
        with pytest.raises(asyncpg.CheckViolationError, match="deleted"):
            async with fresh.transaction() as tx:
                await tx.execute(sql, message)


async def test_message_identity_is_immutable(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        message = await add_message(tx, thread)
    with pytest.raises(asyncpg.CheckViolationError, match="immutable"):
        async with fresh.transaction() as tx:
            await tx.execute("UPDATE messages SET role = 'assistant' WHERE id = $1", message)


async def test_streaming_assistant_text_may_grow_without_a_version(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        message = await add_message(tx, thread, role="assistant", status="streaming", content="")
        await tx.execute("UPDATE messages SET content = 'partial' WHERE id = $1", message)
        await tx.execute(
            "UPDATE messages SET content = 'full', status = 'completed' WHERE id = $1", message
        )
        assert await tx.fetchval("SELECT count(*) FROM message_edits") == 0


async def test_summary_window_is_unique(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        message = await add_message(tx, thread)
        insert = (
            "INSERT INTO summaries (thread_id, start_message_id, end_message_id, start_seq, "
            "end_seq, content, model) VALUES ($1, $2, $2, 1, 1, 's', 'm')"
        )
        await tx.execute(insert, thread, message)
    with pytest.raises(asyncpg.UniqueViolationError):
        async with fresh.transaction() as tx:
            await tx.execute(insert, thread, message)


async def test_usage_is_one_row_per_message_and_never_negative(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        project = await tx.fetchval("SELECT project_id FROM threads WHERE id = $1", thread)
        message = await add_message(tx, thread, role="assistant")
        insert = (
            "INSERT INTO usage_records (message_id, thread_id, project_id, model, prompt_tokens, "
            "completion_tokens, cost_usd, estimated) VALUES ($1, $2, $3, 'm', $4, 1, 0, false)"
        )
        await tx.execute(insert, message, thread, project, 10)
    with pytest.raises(asyncpg.UniqueViolationError):
        async with fresh.transaction() as tx:
            await tx.execute(insert, message, thread, project, 10)
    with pytest.raises(asyncpg.CheckViolationError):
        async with fresh.transaction() as tx:
            other = await add_message(tx, thread, role="assistant")
            await tx.execute(insert, other, thread, project, -5)


async def test_payloads_round_trip_as_json(fresh: Database) -> None:
    async with fresh.transaction() as tx:
        thread = await new_thread(tx)
        await add_message(tx, thread)
        payload = await tx.fetchval(
            "SELECT payload FROM thread_events WHERE thread_id = $1", thread
        )
        raw = await tx.fetchval(
            "SELECT payload::text FROM thread_events WHERE thread_id = $1", thread
        )
    assert isinstance(payload, dict)
    assert json.loads(raw) == payload
