"""Migrations are reversible: up, all the way down, and up again yields the identical schema."""

from __future__ import annotations

import subprocess
from pathlib import Path

from alembic.script import ScriptDirectory

from server import migrate

PG_DUMP = Path(__import__("pgserver").__file__).parent / "pginstall" / "bin" / "pg_dump"


def schema_dump(dsn: str) -> str:
    """The schema as pg_dump prints it, without the migration bookkeeping row."""
    out = subprocess.run(
        [
            str(PG_DUMP),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--exclude-table=public.alembic_version",
            dsn,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return "\n".join(
        line for line in out.splitlines() if line.strip() and not line.startswith("--")
    )


def revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(migrate.alembic_config(""))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def test_up_down_up_gives_the_same_schema_as_one_up(scratch_dsn: str) -> None:
    migrate.upgrade(scratch_dsn)
    once = schema_dump(scratch_dsn)
    assert "CREATE TABLE public.messages" in once

    migrate.downgrade(scratch_dsn, "base")
    empty = schema_dump(scratch_dsn)
    assert "CREATE TABLE public.messages" not in empty
    assert "CREATE FUNCTION" not in empty, "a downgrade left a function behind"

    migrate.upgrade(scratch_dsn)
    assert schema_dump(scratch_dsn) == once


def test_each_migration_down_undoes_its_up(scratch_dsn: str) -> None:
    previous = schema_dump(scratch_dsn)
    for revision in revisions():
        migrate.upgrade(scratch_dsn, revision)
        applied = schema_dump(scratch_dsn)
        assert applied != previous, f"migration {revision} changed nothing"
        migrate.downgrade(scratch_dsn, "-1")
        assert schema_dump(scratch_dsn) == previous, f"downgrade of {revision} is not its inverse"
        migrate.upgrade(scratch_dsn, revision)
        previous = schema_dump(scratch_dsn)


def test_head_revision_is_the_last_migration() -> None:
    assert migrate.head_revision() == revisions()[-1]
