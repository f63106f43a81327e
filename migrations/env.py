"""Alembic environment: plain SQL migrations run over psycopg, one transaction per migration.

Several ``threadline serve`` processes started together on one embedded database each migrate it
at start-up; a session advisory lock makes them take turns (the later ones find it at head).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config

# Held for the whole run by whichever process migrates; the others wait, then find nothing to do.
_MIGRATION_LOCK = "SELECT pg_advisory_lock(hashtext('threadline.migrate'))"


def _sqlalchemy_url(dsn: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix) :]
    return dsn


def run_migrations_online() -> None:
    dsn = config.attributes["dsn"]
    engine = create_engine(_sqlalchemy_url(dsn), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.exec_driver_sql(_MIGRATION_LOCK)
        connection.commit()  # the lock is the session's; released when the connection closes
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported")
run_migrations_online()
