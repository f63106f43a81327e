"""Every durable event is published to the cluster by the transaction that commits it.

A trigger on ``thread_events`` calls ``pg_notify('threadline', ...)`` for each event inserted,
whoever inserts it (commands, replies, the summariser, the stale-reply sweep). PostgreSQL delivers
a notification only if its transaction commits, and always does once it has: publication is tied
to the commit, so no event can be committed and never published (the gap between a commit and an
in-process publish that a cancellation could fall into is gone).

Payload (text, under PostgreSQL's 8,000-byte limit): ``e:<thread_id>:<seq>:<epoch>:<type>:<data>``
where ``epoch`` is the event's ``created_at`` in Unix seconds and ``data`` the event's JSON payload,
left empty when the whole would not fit in ``7900`` bytes; the receiving node then reads the event
from the log (``server/broker.py``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = r"""
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

DOWNGRADE = r"""
DROP TRIGGER thread_events_notify ON thread_events;
DROP FUNCTION tl_thread_events_notify();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
