"""A reply requested with a send starts in one trip, not two: the send reads the history.

Before, a reply's start was two trips through the database bridge after the send had committed:
BEGIN and ``lock_for_reply`` (lock the thread, read the asked message, the latest summary and the
recent turns), the prompt built in Python, then ``tl_insert_reply`` and COMMIT. Now:

* ``tl_send_message`` (0006) takes ``p_history``: when the send asks for a reply it also returns,
  read under the thread lock it already holds, the latest summary and the newest ``p_history``
  turns after it (``summary``, ``turns``: ``[[role, content], ...]``, newest first, the user's new
  message first), what ``lock_for_reply`` would read right after the send.
* ``tl_start_reply`` is the start from that read, in one statement (sent with BEGIN and COMMIT in
  one trip, ``Database.atomic``): it locks the thread and checks that nothing was written in it
  since (``last_seq + 1 = p_seq``; else ``stale``, nothing written: the caller starts the usual
  way) and that no reply of the thread is streaming (``busy``), then does what
  ``tl_insert_reply`` does (the budget check under the project row lock, the message, its event,
  the reservation or the refusal). The thread gone: ``not_found``.

The prompt is built from the history as of the send; ``tl_start_reply`` accepts it only if no
event was written in the thread since (every message written, edited or deleted writes one), so
the reply answers exactly the state it was built from. A summary written in between (summaries
write no event) only means the prompt carries the older summary and more turns.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UPGRADE = r"""
DROP FUNCTION tl_send_message(uuid, uuid, text, text, boolean);

CREATE FUNCTION tl_send_message(
    p_author uuid, p_thread uuid, p_content text, p_client_msg_id text, p_reply boolean,
    p_history integer DEFAULT NULL)
RETURNS TABLE (outcome text, project_id uuid, seq bigint, message text,
               budget numeric, spent numeric, summary text, turns jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t record;
    m messages;
    v_spent numeric;
    v_original text;
    v_payload json;
    v_summary text;
    v_summary_end bigint;
    v_turns jsonb;
BEGIN
    -- Lock the thread (writers of one thread commit in seq order); only the owner's exists.
    SELECT th.project_id, th.last_seq, p.monthly_budget_usd INTO t
      FROM threads th JOIN projects p ON p.id = th.project_id
     WHERE th.id = p_thread AND p.owner_id = p_author
       FOR UPDATE OF th;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::uuid, NULL::bigint, NULL::text,
                            NULL::numeric, NULL::numeric, NULL::text, NULL::jsonb;
        RETURN;
    END IF;
    IF p_client_msg_id IS NOT NULL THEN
        -- A new snapshot: a racing identical send that held the lock before us is visible.
        SELECT * INTO m FROM messages x
         WHERE x.thread_id = p_thread AND x.client_msg_id = p_client_msg_id;
        IF FOUND THEN
            v_original := m.content;
            IF m.version > 1 THEN  -- edited or deleted since: compare with what was sent
                v_original := COALESCE((SELECT e.old_content FROM message_edits e
                                         WHERE e.message_id = m.id AND e.version = 2), m.content);
            END IF;
            RETURN QUERY SELECT
                CASE WHEN v_original = p_content THEN 'existing' ELSE 'conflict' END,
                t.project_id, m.seq, tl_message_json(m)::text, NULL::numeric, NULL::numeric,
                NULL::text, NULL::jsonb;
            RETURN;
        END IF;
    END IF;
    IF p_reply AND t.monthly_budget_usd IS NOT NULL THEN
        v_spent := tl_project_spend(t.project_id);
        IF v_spent >= t.monthly_budget_usd THEN
            RETURN QUERY SELECT 'budget_exceeded'::text, t.project_id, NULL::bigint, NULL::text,
                                t.monthly_budget_usd, v_spent, NULL::text, NULL::jsonb;
            RETURN;
        END IF;
    END IF;
    INSERT INTO messages (thread_id, seq, role, author_id, content, status, client_msg_id)
    VALUES (p_thread, t.last_seq + 1, 'user', p_author, p_content, 'completed', p_client_msg_id)
    RETURNING * INTO m;
    v_payload := tl_message_json(m);
    INSERT INTO thread_events (thread_id, seq, type, payload)
    VALUES (p_thread, m.seq, 'message.created', v_payload::jsonb);
    IF p_reply AND p_history IS NOT NULL THEN
        -- What the reply's prompt is built from, as lock_for_reply reads it (still under the
        -- thread lock): the latest summary and the newest p_history turns after it.
        SELECT s.content, s.end_seq INTO v_summary, v_summary_end
          FROM summaries s WHERE s.thread_id = p_thread ORDER BY s.end_seq DESC LIMIT 1;
        SELECT COALESCE(jsonb_agg(jsonb_build_array(r.role, r.content) ORDER BY r.seq DESC),
                        '[]'::jsonb) INTO v_turns
          FROM (SELECT x.seq, x.role, x.content FROM messages x
                 WHERE x.thread_id = p_thread AND x.seq > COALESCE(v_summary_end, 0)
                   AND x.seq <= m.seq AND x.deleted_at IS NULL
                   AND x.role IN ('user', 'assistant') AND x.content <> ''
                 ORDER BY x.seq DESC LIMIT p_history) r;
    END IF;
    RETURN QUERY SELECT 'created'::text, t.project_id, m.seq, v_payload::text,
                        NULL::numeric, NULL::numeric, v_summary, v_turns;
END $$;

-- outcome: 'started' | 'budget_exceeded' | p_refuse (as tl_insert_reply) | 'stale' (an event was
-- written in the thread since p_seq was read) | 'busy' (a reply of the thread is streaming) |
-- 'not_found' (no such thread in p_project). Only the first three write anything.
CREATE FUNCTION tl_start_reply(
    p_thread uuid, p_project uuid, p_seq bigint, p_reply_to uuid, p_model text,
    p_reserve numeric, p_claimed_by uuid, p_refuse text, p_refuse_text text, p_budget_text text)
RETURNS TABLE (outcome text, message text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_last bigint;
BEGIN
    SELECT th.last_seq INTO v_last FROM threads th
     WHERE th.id = p_thread AND th.project_id = p_project
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::text;
        RETURN;
    END IF;
    IF v_last + 1 <> p_seq THEN
        RETURN QUERY SELECT 'stale'::text, NULL::text;
        RETURN;
    END IF;
    IF p_refuse IS NULL AND EXISTS (SELECT 1 FROM messages g
                                     WHERE g.thread_id = p_thread AND g.status = 'streaming') THEN
        RETURN QUERY SELECT 'busy'::text, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT r.outcome, r.message
                   FROM tl_insert_reply(p_thread, p_project, p_seq, p_reply_to, p_model,
                                        p_reserve, p_claimed_by, p_refuse, p_refuse_text,
                                        p_budget_text) r;
END $$;
"""

DOWNGRADE = r"""
DROP FUNCTION tl_start_reply(uuid, uuid, bigint, uuid, text, numeric, uuid, text, text, text);
DROP FUNCTION tl_send_message(uuid, uuid, text, text, boolean, integer);

CREATE FUNCTION tl_send_message(
    p_author uuid, p_thread uuid, p_content text, p_client_msg_id text, p_reply boolean)
RETURNS TABLE (outcome text, project_id uuid, seq bigint, message text,
               budget numeric, spent numeric)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t record;
    m messages;
    v_spent numeric;
    v_original text;
    v_payload json;
BEGIN
    -- Lock the thread (writers of one thread commit in seq order); only the owner's exists.
    SELECT th.project_id, th.last_seq, p.monthly_budget_usd INTO t
      FROM threads th JOIN projects p ON p.id = th.project_id
     WHERE th.id = p_thread AND p.owner_id = p_author
       FOR UPDATE OF th;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::uuid, NULL::bigint, NULL::text,
                            NULL::numeric, NULL::numeric;
        RETURN;
    END IF;
    IF p_client_msg_id IS NOT NULL THEN
        -- A new snapshot: a racing identical send that held the lock before us is visible.
        SELECT * INTO m FROM messages x
         WHERE x.thread_id = p_thread AND x.client_msg_id = p_client_msg_id;
        IF FOUND THEN
            v_original := m.content;
            IF m.version > 1 THEN  -- edited or deleted since: compare with what was sent
                v_original := COALESCE((SELECT e.old_content FROM message_edits e
                                         WHERE e.message_id = m.id AND e.version = 2), m.content);
            END IF;
            RETURN QUERY SELECT
                CASE WHEN v_original = p_content THEN 'existing' ELSE 'conflict' END,
                t.project_id, m.seq, tl_message_json(m)::text, NULL::numeric, NULL::numeric;
            RETURN;
        END IF;
    END IF;
    IF p_reply AND t.monthly_budget_usd IS NOT NULL THEN
        v_spent := tl_project_spend(t.project_id);
        IF v_spent >= t.monthly_budget_usd THEN
            RETURN QUERY SELECT 'budget_exceeded'::text, t.project_id, NULL::bigint, NULL::text,
                                t.monthly_budget_usd, v_spent;
            RETURN;
        END IF;
    END IF;
    INSERT INTO messages (thread_id, seq, role, author_id, content, status, client_msg_id)
    VALUES (p_thread, t.last_seq + 1, 'user', p_author, p_content, 'completed', p_client_msg_id)
    RETURNING * INTO m;
    v_payload := tl_message_json(m);
    INSERT INTO thread_events (thread_id, seq, type, payload)
    VALUES (p_thread, m.seq, 'message.created', v_payload::jsonb);
    RETURN QUERY SELECT 'created'::text, t.project_id, m.seq, v_payload::text,
                        NULL::numeric, NULL::numeric;
END $$;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
