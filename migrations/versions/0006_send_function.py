"""A send is one statement: ``tl_send_message`` does in the database what took six round trips.

The function locks the thread row (owner checked), answers an idempotent replay (or its
conflict) by ``client_msg_id``, checks the month's budget when a reply is wanted, inserts the
message at the thread's next seq and its ``message.created`` event. Every invariant of the schema
still applies (the event and counter triggers, the deferred created-event check, the UNIQUE
constraints): the function only saves the trips between them. ``tl_message_json`` builds the
event payload exactly as ``server.commands.serialize.message_to_dict`` does (same keys, same
order, RFC 3339 UTC times), and ``tl_project_spend`` is the one definition of a project's spend
this month (usage ledger + reservations in flight) that Python and SQL both use.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- As Python's datetime.isoformat() in UTC with a Z: microseconds only when there are some.
CREATE FUNCTION tl_rfc3339(ts timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN ts IS NULL THEN NULL
        WHEN date_trunc('second', ts) = ts
            THEN to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
        ELSE to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    END
$$;

-- A message as clients see it (server.commands.serialize.message_to_dict): json keeps key order.
CREATE FUNCTION tl_message_json(m messages) RETURNS json
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT json_build_object(
        'id', m.id::text,
        'thread_id', m.thread_id::text,
        'seq', m.seq,
        'role', m.role,
        'content', CASE WHEN m.deleted_at IS NULL THEN m.content ELSE '' END,
        'status', m.status,
        'version', m.version,
        'created_at', tl_rfc3339(m.created_at),
        'edited_at', tl_rfc3339(m.edited_at),
        'deleted', m.deleted_at IS NOT NULL,
        'deleted_at', tl_rfc3339(m.deleted_at),
        'client_msg_id', m.client_msg_id,
        'reply_to', m.reply_to::text,
        'model', m.model)
$$;

-- USD spent by a project this calendar month (UTC), reservations for replies in flight included.
CREATE FUNCTION tl_project_spend(p_project uuid) RETURNS numeric
LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT sum(u.cost_usd) FROM project_usage_ledger u
                      WHERE u.project_id = p_project
                        AND u.created_at >= date_trunc('month', now() AT TIME ZONE 'UTC')
                                            AT TIME ZONE 'UTC'), 0)
         + COALESCE((SELECT sum(r.amount_usd) FROM budget_reservations r
                      WHERE r.project_id = p_project), 0)
$$;

-- outcome: 'created' | 'existing' (same client_msg_id and content: the first message) |
-- 'conflict' (same client_msg_id, other content) | 'not_found' (no such thread of this author) |
-- 'budget_exceeded' (p_reply and the month's spend has reached the budget: nothing written).
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

DOWNGRADE = r"""
DROP FUNCTION tl_send_message(uuid, uuid, text, text, boolean);
DROP FUNCTION tl_project_spend(uuid);
DROP FUNCTION tl_message_json(messages);
DROP FUNCTION tl_rfc3339(timestamptz);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
