"""One generation per reply, cluster-wide: the reply row carries the node generating it.

``messages.claimed_by`` is the incarnation (``nodes.incarnation``) of the process that generates
a reply, set in the transaction that starts it. While the reply is ``streaming`` that node alone
calls the provider, saves its text and ends it; if the node dies (its ``nodes`` row stops being
refreshed), any other node ends the reply as ``interrupted``, keeping the text saved so far.

Invariants, in the schema:
* at most one ``streaming`` reply per thread (``messages_one_streaming_reply``): one reply per
  thread runs at a time in the whole cluster; replies left ``streaming`` in a thread by a crashed
  process (before this revision only the newest could still be alive) are ended here first, each
  with its ``assistant.failed`` event;
* at most one assistant reply per user message (``messages_one_reply_per_message``);
* only an assistant message has a claim.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE messages ADD COLUMN claimed_by uuid,
    ADD CONSTRAINT messages_claim_is_a_reply CHECK (claimed_by IS NULL OR role = 'assistant');

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT m.id, m.thread_id, m.content FROM messages m
              WHERE m.status = 'streaming'
                AND EXISTS (SELECT 1 FROM messages n
                             WHERE n.thread_id = m.thread_id AND n.status = 'streaming'
                               AND (n.created_at, n.id) > (m.created_at, m.id))
              ORDER BY m.thread_id, m.created_at
    LOOP
        UPDATE messages SET status = 'interrupted' WHERE id = r.id;
        DELETE FROM budget_reservations WHERE message_id = r.id;
        INSERT INTO thread_events (thread_id, seq, type, payload)
        VALUES (r.thread_id, NULL, 'assistant.failed',
                jsonb_build_object('message_id', r.id, 'content', r.content,
                                   'status', 'interrupted', 'reason', 'interrupted',
                                   'message', 'The server stopped while the reply was being written.',
                                   'usage', NULL));
    END LOOP;
END $$;

DROP INDEX messages_streaming_idx;
CREATE UNIQUE INDEX messages_one_streaming_reply ON messages (thread_id) WHERE status = 'streaming';
CREATE UNIQUE INDEX messages_one_reply_per_message ON messages (reply_to) WHERE role = 'assistant';
"""

DOWNGRADE = r"""
DROP INDEX messages_one_reply_per_message;
DROP INDEX messages_one_streaming_reply;
CREATE INDEX messages_streaming_idx ON messages (thread_id) WHERE status = 'streaming';
ALTER TABLE messages DROP CONSTRAINT messages_claim_is_a_reply, DROP COLUMN claimed_by;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
