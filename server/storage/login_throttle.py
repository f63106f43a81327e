"""SQL for the per-account login throttle (table ``login_throttle``, migration 0007)."""

from __future__ import annotations

from server.db import Database


async def admit_attempt(
    db: Database, key: bytes, *, free: int, base_s: float, max_s: float, forget_after_s: float
) -> float | None:
    """Count one login attempt for ``key`` if its delay has passed: None (admitted), else the
    seconds left to wait.

    One statement, so concurrent attempts on any number of nodes are admitted one by one (the
    row lock orders them) and each admitted attempt pushes the next one out. Also removes a few
    rows nobody has tried for ``forget_after_s``.
    """
    admitted = await db.fetchval(
        """
        WITH forgotten AS (
            DELETE FROM login_throttle
             WHERE key IN (SELECT key FROM login_throttle
                            WHERE last_attempt_at < now() - make_interval(secs => $5)
                              AND blocked_until < now() AND key <> $1
                            LIMIT 20)
        )
        INSERT INTO login_throttle AS t (key, failures, last_attempt_at, blocked_until)
        VALUES ($1, 1, now(), now() + login_throttle_delay(1, $2, $3, $4))
        ON CONFLICT (key) DO UPDATE
           -- Every expression reads the row as it was (the latest version: under concurrency
           -- the attempt that waited for the row lock sees the one before it).
           SET failures = CASE WHEN t.last_attempt_at < now() - make_interval(secs => $5)
                               THEN 1 ELSE t.failures + 1 END,
               blocked_until = now() + login_throttle_delay(
                   CASE WHEN t.last_attempt_at < now() - make_interval(secs => $5)
                        THEN 1 ELSE t.failures + 1 END, $2, $3, $4),
               last_attempt_at = now()
         WHERE t.blocked_until <= now()
        RETURNING failures
        """,
        key,
        free,
        base_s,
        max_s,
        forget_after_s,
    )
    if admitted is not None:
        return None
    wait = await db.fetchval(
        "SELECT extract(epoch FROM blocked_until - now())::float8 FROM login_throttle"
        " WHERE key = $1",
        key,
    )
    return max(float(wait or 0.0), 0.001)


async def forget(db: Database, key: bytes) -> None:
    """A successful login: the account's count starts again from zero."""
    await db.fetchval("DELETE FROM login_throttle WHERE key = $1", key)
