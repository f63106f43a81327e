"""The end of a reply start in one statement: ``tl_insert_reply`` checks the budget and writes.

A reply's start transaction locks the thread row and reads what the prompt is built from; it then
ends with this one statement, followed by COMMIT in the same trip through the database bridge
(``TransactionTx.commit_with``). The statement checks a budgeted project's month (the project row
locked, as before: concurrent replies cannot overshoot together), then writes the assistant
message (``streaming``, claimed by the generating node; ``failed`` when refused), its
``message.created`` event, and either the reply's budget reservation or, refused, its
``assistant.failed`` event. So the project row is held for one statement and a COMMIT, with no
hand-over to the event loop in between, where it used to be held across three trips (lock, insert,
commit), each waiting for a busy server's event loop.

``outcome`` is ``'started'``, ``'budget_exceeded'``, or the refusal passed in ``p_refuse``.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE FUNCTION tl_insert_reply(
    p_thread uuid, p_project uuid, p_seq bigint, p_reply_to uuid, p_model text,
    p_reserve numeric, p_claimed_by uuid, p_refuse text, p_refuse_text text, p_budget_text text)
RETURNS TABLE (outcome text, message text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_refuse text := p_refuse;
    v_text text := p_refuse_text;
    v_budget numeric;
    m messages;
    v_payload json;
BEGIN
    IF v_refuse IS NULL
       AND (SELECT monthly_budget_usd FROM projects WHERE id = p_project) IS NOT NULL THEN
        -- Only budgeted projects serialise their starts on the project row, until the COMMIT
        -- that follows this statement.
        SELECT monthly_budget_usd INTO v_budget FROM projects WHERE id = p_project FOR UPDATE;
        IF v_budget IS NOT NULL AND tl_project_spend(p_project) + p_reserve > v_budget THEN
            v_refuse := 'budget_exceeded';
            v_text := p_budget_text;
        END IF;
    END IF;
    INSERT INTO messages (thread_id, seq, role, author_id, content, status, reply_to, model,
                          claimed_by)
    VALUES (p_thread, p_seq, 'assistant', NULL, '',
            CASE WHEN v_refuse IS NULL THEN 'streaming' ELSE 'failed' END, p_reply_to, p_model,
            CASE WHEN v_refuse IS NULL THEN p_claimed_by END)
    RETURNING * INTO m;
    v_payload := tl_message_json(m);
    INSERT INTO thread_events (thread_id, seq, type, payload)
    VALUES (p_thread, m.seq, 'message.created', v_payload::jsonb);
    IF v_refuse IS NULL THEN
        IF p_reserve IS NOT NULL THEN
            INSERT INTO budget_reservations (message_id, project_id, amount_usd)
            VALUES (m.id, p_project, p_reserve);
        END IF;
    ELSE
        INSERT INTO thread_events (thread_id, seq, type, payload)
        VALUES (p_thread, m.seq + 1, 'assistant.failed',
                jsonb_build_object('message_id', m.id::text, 'content', '', 'status', 'failed',
                                   'reason', v_refuse, 'message', v_text));
    END IF;
    RETURN QUERY SELECT COALESCE(v_refuse, 'started'), v_payload::text;
END $$;
"""

DOWNGRADE = r"""
DROP FUNCTION tl_insert_reply(uuid, uuid, bigint, uuid, text, numeric, uuid, text, text, text);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
