"""Per-account login throttling: one row per account under attack, shared by every node.

A login attempt for an e-mail address is admitted only when the address's ``blocked_until`` has
passed; each admitted attempt is counted as a failure until it succeeds (a success deletes the
row), and pushes ``blocked_until`` out by an exponentially growing, capped delay. Keyed by the
SHA-256 of the normalised e-mail (no address is stored, and unknown addresses are throttled
exactly like real ones, so the throttle reveals nothing about which accounts exist).

Invariants in the schema: a 32-byte key, a positive count, and a delay of at most one hour after
the last attempt whatever the configuration says (the cap that keeps this from being a lock-out).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE login_throttle (
    key bytea PRIMARY KEY CONSTRAINT login_throttle_key_check CHECK (octet_length(key) = 32),
    failures integer NOT NULL CONSTRAINT login_throttle_failures_check CHECK (failures > 0),
    last_attempt_at timestamptz NOT NULL,
    blocked_until timestamptz NOT NULL,
    CONSTRAINT login_throttle_delay_check CHECK (
        blocked_until >= last_attempt_at AND blocked_until <= last_attempt_at + interval '1 hour'
    )
);
CREATE INDEX login_throttle_last_attempt_at_idx ON login_throttle (last_attempt_at);

-- The wait after the n-th attempt: none after the first ``free - 1``, so ``free`` attempts go
-- through at once; then base, 2 base, 4 base... up to ``max_s``. One definition for every node.
CREATE FUNCTION login_throttle_delay(attempts integer, free integer, base_s float8, max_s float8)
RETURNS interval LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN attempts < free THEN interval '0'
                ELSE make_interval(secs => least(max_s, base_s * power(2, least(attempts - free, 40))))
           END
$$;
"""

DOWNGRADE = r"""
DROP FUNCTION login_throttle_delay(integer, integer, float8, float8);
DROP TABLE login_throttle;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
