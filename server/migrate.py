"""Schema migrations (Alembic, plain SQL in ``migrations/versions``), run synchronously."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(dsn: str) -> Config:
    """An Alembic config pointing at our migrations and at ``dsn`` (kept out of any .ini file)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["dsn"] = dsn
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this build."""
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None, "no migrations found"
    return head


def upgrade(dsn: str, to: str = "head") -> None:
    """Migrate up to ``to`` (default: head)."""
    command.upgrade(alembic_config(dsn), to)


def downgrade(dsn: str, to: str = "base") -> None:
    """Migrate down to ``to`` (a revision, ``-1``, or ``base``)."""
    command.downgrade(alembic_config(dsn), to)
