"""The `threadline` command against a real database, and counter reconciliation."""

from __future__ import annotations

import json

import psycopg
import pytest

from server.cli import main
from server.db import Database
from server.storage.reconcile import reconcile


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_migrate_up_and_down_by_command(scratch_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_DATABASE_URL", scratch_dsn)
    monkeypatch.setenv("THREADLINE_LOG_FORMAT", "json")
    assert main(["migrate", "up"]) == 0
    assert {"users", "messages", "thread_events", "message_edits"} <= _tables(scratch_dsn)
    assert main(["migrate", "down", "--to", "base"]) == 0
    assert _tables(scratch_dsn) <= {"alembic_version"}


def test_reconcile_command_prints_a_report(
    scratch_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("THREADLINE_DATABASE_URL", scratch_dsn)
    assert main(["migrate", "up"]) == 0
    capsys.readouterr()
    assert main(["reconcile"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["threads_repaired"] == 0


async def test_reconcile_finds_and_repairs_drift(db: Database) -> None:
    async with db.transaction() as tx:
        user = await tx.fetchval(
            "INSERT INTO users (email, password_hash) VALUES ($1, 'x') RETURNING id",
            f"rec-{id(tx)}@example.com",
        )
        project = await tx.fetchval(
            "INSERT INTO projects (owner_id, name) VALUES ($1, 'p') RETURNING id", user
        )
        thread = await tx.fetchval(
            "INSERT INTO threads (project_id, title) VALUES ($1, 't') RETURNING id", project
        )
        await tx.execute(
            "INSERT INTO messages (thread_id, seq, role, content) VALUES ($1, 1, 'user', 'a')",
            thread,
        )
        await tx.execute(
            "INSERT INTO thread_events (thread_id, seq, type, payload) "
            "VALUES ($1, 1, 'message.created', '{}')",
            thread,
        )
    async with db.transaction() as tx:  # simulate drift, e.g. after a bad manual fix
        await tx.execute(
            "UPDATE threads SET message_count = 7, last_seq = 0, last_message_at = NULL "
            "WHERE id = $1",
            thread,
        )
    report = await reconcile(db)
    assert report["threads_repaired"] >= 1
    assert report["message_count"] >= 1
    assert report["last_seq"] >= 1
    assert report["last_message_at"] >= 1
    row = await db.fetchrow("SELECT * FROM threads WHERE id = $1", thread)
    assert row is not None
    assert (row["message_count"], row["last_seq"]) == (1, 1)
    assert row["last_message_at"] is not None
    again = await reconcile(db)
    assert again["threads_repaired"] == 0
