"""Rate limits shared by the cluster: one token bucket per key, leased out to the nodes.

``rate_buckets`` holds each key's level (``user:<id>``, ``ip:<address>``) as of ``updated_at``.
Nodes do not touch it per request: each node serves requests from a local lease and, at most every
50 ms, sends one statement for every key that needs it (``tl_rate_lease``): it charges what it
granted without a lease, returns what it no longer needs and asks for more; the function refills
each bucket for the time elapsed (``rate`` per second, capped at ``burst``), charges, grants what
it can and stores the rest. Keys are locked in sorted order, so concurrent nodes never deadlock.
See ``server/cluster_limits.py`` for the error bound.

UNLOGGED: rate-limit state is not worth a WAL write per change; after a PostgreSQL crash the
buckets start full again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE UNLOGGED TABLE rate_buckets (
    key        text PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 300),
    level      float8 NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX rate_buckets_updated_idx ON rate_buckets (updated_at);

CREATE FUNCTION tl_rate_lease(keys text[], charges float8[], wants float8[], returns float8[],
                              rates float8[], bursts float8[])
RETURNS TABLE (bucket_key text, granted float8, bucket_level float8)
LANGUAGE plpgsql AS $$
DECLARE
    i int;
    cur float8;
    seen timestamptz;
    now_ts timestamptz := clock_timestamp();
BEGIN
    FOR i IN SELECT u.ord FROM unnest(keys) WITH ORDINALITY AS u(k, ord) ORDER BY u.k LOOP
        INSERT INTO rate_buckets AS b (key, level, updated_at)
        VALUES (keys[i], bursts[i], now_ts) ON CONFLICT (key) DO NOTHING;
        SELECT b.level, b.updated_at INTO cur, seen FROM rate_buckets b
         WHERE b.key = keys[i] FOR UPDATE;
        cur := least(bursts[i], cur + greatest(0, extract(epoch FROM now_ts - seen)) * rates[i]);
        cur := least(bursts[i], cur - charges[i] + returns[i]);
        granted := greatest(0, least(wants[i], cur));
        cur := cur - granted;
        UPDATE rate_buckets b SET level = cur, updated_at = now_ts WHERE b.key = keys[i];
        bucket_key := keys[i];
        bucket_level := cur;
        RETURN NEXT;
    END LOOP;
END $$;
"""

DOWNGRADE = r"""
DROP FUNCTION tl_rate_lease(text[], float8[], float8[], float8[], float8[], float8[]);
DROP TABLE rate_buckets;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
