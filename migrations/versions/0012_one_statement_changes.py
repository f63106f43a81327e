"""The thread row is locked only inside one statement: edits, deletes and a reply's end.

Sends (``tl_send_message``, 0006) already locked their thread in one statement. An edit or a
delete took four statements (find the thread, lock it, lock the message and check its version,
update it, append the event) and a reply's end three or four (lock the thread, update the
message and release its reservation, the usage row, the closing event), each a round trip
through the server's event loop with the thread row held: under the soak most lock waits were on
such a transaction idle between two of its statements (docs/reliability.md). Each is now one
plpgsql function called in one statement, its COMMIT sent in the same trip (``Database.atomic``),
so the row is held for the statement and its COMMIT only.

Every invariant still lives in the schema and applies unchanged: the audit trail
(``message_edits``) is written by ``messages_guard`` with the editor read from
``threadline.actor_id``, which ``tl_change_message`` sets for its transaction; versions +1 and
gap-free seqs are checked by the same triggers; the usage row and its UNIQUE message; the
reservation released with the reply's end.

``tl_change_message`` outcomes: ``edited`` / ``deleted`` (with the next seq and the message as
``tl_message_json``), else ``not_found``, ``version_conflict`` / ``is_deleted`` (with the current
version), ``streaming``: nothing written. ``tl_finish_reply`` outcomes: ``finished`` (the closing
event's seq and the message's final content), ``claim_lost`` (no longer streaming: another node
ended it; only the usage row is written), ``not_found`` (no such thread: nothing written).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- p_content NULL: a delete (a tombstone). Lock order as every writer: thread row, then message.
CREATE FUNCTION tl_change_message(
    p_actor uuid, p_message uuid, p_expected integer, p_content text)
RETURNS TABLE (outcome text, thread_id uuid, seq bigint, current_version integer, message text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_thread uuid;
    v_seq bigint;
    m messages;
    v_payload json;
BEGIN
    PERFORM set_config('threadline.actor_id', p_actor::text, true);  -- the audit's editor
    SELECT x.thread_id INTO v_thread FROM messages x
      JOIN threads t ON t.id = x.thread_id JOIN projects p ON p.id = t.project_id
     WHERE x.id = p_message AND p.owner_id = p_actor;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::uuid, NULL::bigint, NULL::integer, NULL::text;
        RETURN;
    END IF;
    SELECT t.last_seq + 1 INTO v_seq FROM threads t WHERE t.id = v_thread FOR UPDATE;
    IF NOT FOUND THEN  -- the thread was deleted since
        RETURN QUERY SELECT 'not_found'::text, NULL::uuid, NULL::bigint, NULL::integer, NULL::text;
        RETURN;
    END IF;
    -- A new snapshot, taken after the thread lock: the latest committed version.
    SELECT x.* INTO m FROM messages x
      JOIN threads t ON t.id = x.thread_id JOIN projects p ON p.id = t.project_id
     WHERE x.id = p_message AND p.owner_id = p_actor
       FOR UPDATE OF x;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::uuid, NULL::bigint, NULL::integer, NULL::text;
        RETURN;
    END IF;
    IF m.version <> p_expected THEN
        RETURN QUERY SELECT 'version_conflict'::text, v_thread, NULL::bigint, m.version, NULL::text;
        RETURN;
    END IF;
    IF m.deleted_at IS NOT NULL THEN
        RETURN QUERY SELECT 'is_deleted'::text, v_thread, NULL::bigint, m.version, NULL::text;
        RETURN;
    END IF;
    IF m.status = 'streaming' THEN
        RETURN QUERY SELECT 'streaming'::text, v_thread, NULL::bigint, m.version, NULL::text;
        RETURN;
    END IF;
    IF p_content IS NULL THEN
        UPDATE messages x SET content = '', version = p_expected + 1,
                              deleted_at = clock_timestamp()
         WHERE x.id = p_message AND x.version = p_expected RETURNING x.* INTO m;
    ELSE
        UPDATE messages x SET content = p_content, version = p_expected + 1
         WHERE x.id = p_message AND x.version = p_expected RETURNING x.* INTO m;
    END IF;
    v_payload := tl_message_json(m);
    INSERT INTO thread_events (thread_id, seq, type, payload)
    VALUES (v_thread, v_seq,
            CASE WHEN p_content IS NULL THEN 'message.deleted' ELSE 'message.updated' END,
            v_payload::jsonb);
    RETURN QUERY SELECT CASE WHEN p_content IS NULL THEN 'deleted' ELSE 'edited' END,
                        v_thread, v_seq, m.version, v_payload::text;
END $$;

-- A reply's end: final status (p_content NULL keeps the text saved so far, and the event's
-- "content" is that text), reservation released, usage row (when p_prompt_tokens is given:
-- spent either way, so written even if the claim was lost), closing event p_type/p_payload.
CREATE FUNCTION tl_finish_reply(
    p_thread uuid, p_project uuid, p_message uuid, p_status text, p_content text, p_model text,
    p_type text, p_payload jsonb, p_prompt_tokens integer, p_completion_tokens integer,
    p_cost numeric, p_estimated boolean)
RETURNS TABLE (outcome text, seq bigint, content text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_seq bigint;
    m messages;
    v_found boolean;
    v_payload jsonb := p_payload;
BEGIN
    SELECT t.last_seq + 1 INTO v_seq FROM threads t WHERE t.id = p_thread FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    DELETE FROM budget_reservations r WHERE r.message_id = p_message;
    -- A message the user deleted meanwhile keeps its tombstone (only its status changes).
    UPDATE messages x
       SET status = p_status, model = COALESCE(p_model, x.model),
           content = CASE WHEN x.deleted_at IS NULL THEN COALESCE(p_content, x.content)
                          ELSE x.content END
     WHERE x.id = p_message AND x.status = 'streaming'
    RETURNING x.* INTO m;
    v_found := FOUND;
    IF p_prompt_tokens IS NOT NULL THEN
        INSERT INTO usage_records (message_id, thread_id, project_id, model, prompt_tokens,
                                   completion_tokens, cost_usd, estimated)
        VALUES (p_message, p_thread, p_project, p_model, p_prompt_tokens, p_completion_tokens,
                p_cost, p_estimated);
    END IF;
    IF NOT v_found THEN
        RETURN QUERY SELECT 'claim_lost'::text, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    IF p_content IS NULL THEN
        v_payload := v_payload || jsonb_build_object('content', m.content);
    END IF;
    INSERT INTO thread_events (thread_id, seq, type, payload)
    VALUES (p_thread, v_seq, p_type, v_payload);
    RETURN QUERY SELECT 'finished'::text, v_seq, m.content;
END $$;
"""

DOWNGRADE = r"""
DROP FUNCTION tl_finish_reply(uuid, uuid, uuid, text, text, text, text, jsonb, integer, integer,
                              numeric, boolean);
DROP FUNCTION tl_change_message(uuid, uuid, integer, text);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
