"""Durable events are published after commit, not by the committing transaction.

Migration 0004 made every transaction that inserts into ``thread_events`` call ``pg_notify``.
Measured side by side (``loadtests/bench_writes.py --without-notify``, then
``loadtests/bench_cluster.py``), that costs the write path more than it should on a busy disk: PostgreSQL
serialises the commits of notifying transactions on one lock held while the commit record is
flushed, so concurrent sends stop sharing their WAL flushes. The writing node now publishes each
durable event after commit from its broker connection (asynchronous commit, several per
statement), and every node's thread actors compare their last seq with ``threads.last_seq`` every
second, so an event whose publication was lost (the writer cancelled or died between its commit
and its publish, a broker outage) is still delivered, a second later (``server/broker.py``,
``actors/hub.py``).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UPGRADE = r"""
DROP TRIGGER thread_events_notify ON thread_events;
DROP FUNCTION tl_thread_events_notify();
"""

DOWNGRADE = r"""
CREATE FUNCTION tl_thread_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head text := 'e:' || NEW.thread_id::text || ':' || NEW.seq::text || ':'
                 || extract(epoch FROM NEW.created_at)::text || ':' || NEW.type || ':';
    body text := NEW.payload::text;
BEGIN
    IF octet_length(head) + octet_length(body) > 7900 THEN
        body := '';
    END IF;
    PERFORM pg_notify('threadline', head || body);
    RETURN NULL;
END $$;
CREATE TRIGGER thread_events_notify AFTER INSERT ON thread_events
    FOR EACH ROW EXECUTE FUNCTION tl_thread_events_notify();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
