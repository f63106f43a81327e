"""Revocations as a feed each node polls: the revoking transaction's id on every revocation, and
a record of deleted users.

A node keeps the tokens it has verified in memory and polls "what was revoked since my last
poll" at least once per ``THREADLINE_AUTH_REVOCATION_BOUND_S`` (``server/authcache.py``). Rows
are found by the id of the transaction that wrote them (``xid8``), compared with the previous
poll's snapshot ``xmin``: every transaction below that horizon had finished when the previous
poll ran, so a revocation that commits late is still found by the next poll (a timestamp, taken
before commit, could fall behind a poll and be missed).

A deleted user's tokens must stop working too, but ``revoked_tokens`` rows go with their user
(``ON DELETE CASCADE``), so a trigger records each deleted user in ``deleted_users``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE revoked_tokens ADD COLUMN revoked_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX revoked_tokens_xid_idx ON revoked_tokens (revoked_xid);

CREATE TABLE deleted_users (
    user_id     uuid PRIMARY KEY,
    deleted_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    deleted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deleted_users_xid_idx ON deleted_users (deleted_xid);

CREATE FUNCTION tl_users_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deleted_users (user_id) VALUES (OLD.id) ON CONFLICT (user_id) DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER users_deleted AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION tl_users_deleted();
"""

DOWNGRADE = r"""
DROP TRIGGER users_deleted ON users;
DROP FUNCTION tl_users_deleted();
DROP TABLE deleted_users;
DROP INDEX revoked_tokens_xid_idx;
ALTER TABLE revoked_tokens DROP COLUMN revoked_xid;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
