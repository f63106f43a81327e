"""SQL for access tokens: the server-side revocation list, keyed by the token's ``jti``."""

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


async def purge_expired(tx: Tx) -> int:
    """Forget revocations of tokens that have expired (they are refused on ``exp`` anyway)."""
    status = await tx.execute("DELETE FROM revoked_tokens WHERE expires_at < now()")
    return int(status.split()[-1])
