"""SQL for access tokens: the server-side revocation list, keyed by the token's ``jti``, and the
feed of revocations and deleted users every node polls (migration 0005)."""

from __future__ import annotations

from datetime import datetime

from server.db import Record, Tx


async def revoke_token(tx: Tx, jti: str, user_id: str, expires_at: datetime) -> None:
    """Revoke a token until it would have expired anyway (idempotent)."""
    await tx.execute(
        """
        INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES ($1, $2, $3)
        ON CONFLICT (jti) DO NOTHING
        """,
        jti,
        user_id,
        expires_at,
    )


async def get_session_user(tx: Tx, user_id: str, jti: str) -> Record | None:
    """The token's user with ``revoked`` telling whether ``jti`` is revoked; None if no such user.

    One round trip per authenticated request: the user must still exist and the token must not
    have been revoked.
    """
    return await tx.fetchrow(
        """
        SELECT u.id, u.email,
               EXISTS (SELECT 1 FROM revoked_tokens r WHERE r.jti = $2) AS revoked
          FROM users u
         WHERE u.id = $1
        """,
        user_id,
        jti,
    )


async def purge_expired(tx: Tx, token_ttl_s: float) -> int:
    """Forget revocations of tokens that have expired (they are refused on ``exp`` anyway), and
    deleted users whose every token has expired."""
    status = await tx.execute("DELETE FROM revoked_tokens WHERE expires_at < now()")
    await tx.execute(
        "DELETE FROM deleted_users WHERE deleted_at < now() - make_interval(secs => $1)",
        token_ttl_s,
    )
    return int(status.split()[-1])


async def revocations_since(tx: Tx, horizon: int) -> Record:
    """Revocations and user deletions written by transactions at or after ``horizon``.

    Columns: ``horizon`` (the ``xmin`` of this statement's snapshot: pass it to the next call),
    ``revoked`` (``[[jti, expires_at_unix], ...]`` for unexpired tokens) and ``deleted``
    (``[user_id, ...]``). Every transaction below the returned horizon had ended when this
    statement ran, so what commits later has an id at or above it and is found next time.
    """
    row = await tx.fetchrow(
        """
        SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon,
               COALESCE((SELECT jsonb_agg(jsonb_build_array(r.jti,
                                                            extract(epoch FROM r.expires_at)))
                           FROM revoked_tokens r
                          WHERE r.revoked_xid >= $1::text::xid8 AND r.expires_at > now()),
                        '[]'::jsonb) AS revoked,
               COALESCE((SELECT jsonb_agg(d.user_id::text) FROM deleted_users d
                          WHERE d.deleted_xid >= $1::text::xid8), '[]'::jsonb) AS deleted
        """,
        str(horizon),
    )
    assert row is not None
    return row
