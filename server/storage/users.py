"""SQL for users. E-mail addresses are unique case-insensitively (``users_email_lower_key``)."""

from __future__ import annotations

from server.db import Record, Tx


async def insert_user(tx: Tx, email: str, password_hash: str) -> Record:
    """Create a user. The database refuses a taken e-mail and, single-user, a second user."""
    row = await tx.fetchrow(
        """
        INSERT INTO users (email, password_hash) VALUES ($1, $2)
        RETURNING id, email, password_hash, created_at
        """,
        email,
        password_hash,
    )
    assert row is not None
    return row


async def get_user_by_email(tx: Tx, email: str) -> Record | None:
    """The user with this e-mail, compared case-insensitively, or None."""
    return await tx.fetchrow(
        "SELECT id, email, password_hash, created_at FROM users WHERE lower(email) = lower($1)",
        email,
    )


async def get_user(tx: Tx, user_id: str) -> Record | None:
    """The user with this id, or None."""
    return await tx.fetchrow(
        "SELECT id, email, password_hash, created_at FROM users WHERE id = $1", user_id
    )


async def set_password_hash(tx: Tx, user_id: str, password_hash: str) -> None:
    """Replace a user's password hash (used to upgrade hashes made with older parameters)."""
    await tx.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)
