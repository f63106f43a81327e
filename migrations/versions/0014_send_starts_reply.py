"""A send that asks for a reply starts it in the same statement: one trip, one COMMIT.

Before (0013) a reply asked for by a send took two transactions: the send (``tl_send_message``,
which also read the history), then, from the reply's worker, ``tl_start_reply`` with its own
COMMIT. The start needed the prompt's token count for the budget reservation, computed in Python
(tiktoken) from the turns read. Now the count is stored at write time:

* ``messages.content_tokens``: cl100k tokens of the message's content as the prompt builder
  sends it (``server.llm.prompt.clean`` applied), written by the writer that knows the content:
  ``tl_send_and_start`` for a user's message, the 13-argument ``tl_finish_reply`` for a reply's
  final text. NULL for rows written before, by other writers, or whose content changed since
  (``messages_tokens_stale`` clears it on any change of ``content`` that does not set it).
* ``summaries.content_tokens``: the tokens of the summary's prompt message (its prefix
  included), written by the summariser.

``tl_send_and_start`` is ``tl_send_message`` (0013) plus, with ``p_reply``, the reply's start
in the same transaction, under the thread lock the send holds: the turns that fit the context
budget chosen exactly as ``build_prompt`` does (newest first, stop at the first that does not
fit) from the stored counts and the fixed costs passed by the caller (system prompt, per-message
framing), the reservation ``ceil_1e-6((prompt * p_price_prompt + p_max_reply *
p_price_completion) / 1000)``, then ``tl_insert_reply`` (budget under the project row lock, the
assistant message, its event, the reservation or the refusal). Its ``reply`` column:
``started``, a refusal (``budget_exceeded``, ``p_refuse``), ``busy`` (a reply of the thread is
streaming: nothing of the reply written), ``fallback`` (a count is missing where the prompt
would be built, or the newest turn alone does not fit: nothing of the reply written, the
history is returned as 0013 did and the caller starts the reply with ``tl_start_reply``), or
NULL (no reply asked, ``p_model`` NULL: the caller starts it, or the send wrote nothing).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE messages ADD COLUMN content_tokens integer CHECK (content_tokens >= 0);
ALTER TABLE summaries ADD COLUMN content_tokens integer CHECK (content_tokens >= 0);

-- A stored count never outlives the content it counted.
CREATE FUNCTION tl_messages_tokens_stale() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.content IS DISTINCT FROM OLD.content
       AND NEW.content_tokens IS NOT DISTINCT FROM OLD.content_tokens THEN
        NEW.content_tokens := NULL;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER messages_tokens_stale BEFORE UPDATE OF content ON messages
    FOR EACH ROW EXECUTE FUNCTION tl_messages_tokens_stale();

-- A reply's end that also stores its final text's token count (p_content_tokens, counted from
-- p_content): the 12-argument function (0012), then the count if the text is still that one.
CREATE FUNCTION tl_finish_reply(
    p_thread uuid, p_project uuid, p_message uuid, p_status text, p_content text, p_model text,
    p_type text, p_payload jsonb, p_prompt_tokens integer, p_completion_tokens integer,
    p_cost numeric, p_estimated boolean, p_content_tokens integer)
RETURNS TABLE (outcome text, seq bigint, content text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM tl_finish_reply(p_thread, p_project, p_message, p_status, p_content,
                                         p_model, p_type, p_payload, p_prompt_tokens,
                                         p_completion_tokens, p_cost, p_estimated) f;
    IF r.outcome = 'finished' AND p_content IS NOT NULL AND p_content_tokens IS NOT NULL THEN
        UPDATE messages x SET content_tokens = p_content_tokens
         WHERE x.id = p_message AND x.deleted_at IS NULL AND x.content = p_content;
    END IF;
    RETURN QUERY SELECT r.outcome, r.seq, r.content;
END $$;

CREATE FUNCTION tl_send_and_start(
    p_author uuid, p_thread uuid, p_content text, p_client_msg_id text, p_reply boolean,
    p_tokens integer, p_history integer, p_head_tokens integer, p_summary_overhead integer,
    p_user_overhead integer, p_assistant_overhead integer, p_prompt_budget integer,
    p_price_prompt numeric, p_price_completion numeric, p_max_reply integer, p_model text,
    p_claimed_by uuid, p_refuse text, p_refuse_text text, p_budget_text text)
RETURNS TABLE (outcome text, project_id uuid, seq bigint, message text,
               budget numeric, spent numeric, summary text, turns jsonb,
               reply text, reply_message text, prompt_tokens integer, reserve numeric,
               whole boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t record;
    m messages;
    r record;
    v_spent numeric;
    v_original text;
    v_payload json;
    v_summary text;
    v_summary_end bigint;
    v_summary_tokens integer;
    v_turns jsonb;
    v_used integer;
    v_cost integer;
    v_n integer := 0;
    v_read integer := 0;
    v_fits boolean := true;
    v_whole boolean := true;
    v_reserve numeric;
    v_reply text;
    v_reply_message text;
BEGIN
    -- As tl_send_message (0013): lock the thread (writers of one thread commit in seq order);
    -- only the owner's exists.
    SELECT th.project_id, th.last_seq, p.monthly_budget_usd INTO t
      FROM threads th JOIN projects p ON p.id = th.project_id
     WHERE th.id = p_thread AND p.owner_id = p_author
       FOR UPDATE OF th;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::uuid, NULL::bigint, NULL::text,
                            NULL::numeric, NULL::numeric, NULL::text, NULL::jsonb,
                            NULL::text, NULL::text, NULL::integer, NULL::numeric, NULL::boolean;
        RETURN;
    END IF;
    IF p_client_msg_id IS NOT NULL THEN
        -- A new snapshot: a racing identical send that held the lock before us is visible.
        -- A retried send never starts a second reply.
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
                NULL::text, NULL::jsonb, NULL::text, NULL::text, NULL::integer, NULL::numeric,
                NULL::boolean;
            RETURN;
        END IF;
    END IF;
    IF p_reply AND t.monthly_budget_usd IS NOT NULL THEN
        v_spent := tl_project_spend(t.project_id);
        IF v_spent >= t.monthly_budget_usd THEN
            RETURN QUERY SELECT 'budget_exceeded'::text, t.project_id, NULL::bigint, NULL::text,
                                t.monthly_budget_usd, v_spent, NULL::text, NULL::jsonb,
                                NULL::text, NULL::text, NULL::integer, NULL::numeric,
                                NULL::boolean;
            RETURN;
        END IF;
    END IF;
    INSERT INTO messages (thread_id, seq, role, author_id, content, status, client_msg_id,
                          content_tokens)
    VALUES (p_thread, t.last_seq + 1, 'user', p_author, p_content, 'completed', p_client_msg_id,
            p_tokens)
    RETURNING * INTO m;
    v_payload := tl_message_json(m);
    INSERT INTO thread_events (thread_id, seq, type, payload)
    VALUES (p_thread, m.seq, 'message.created', v_payload::jsonb);
    IF p_reply AND p_model IS NOT NULL THEN  -- p_model NULL: the caller starts the reply
        IF p_refuse IS NULL AND EXISTS (SELECT 1 FROM messages g
                                         WHERE g.thread_id = p_thread AND g.status = 'streaming')
        THEN
            v_reply := 'busy';
        ELSE
            SELECT s.content, s.end_seq, s.content_tokens
              INTO v_summary, v_summary_end, v_summary_tokens
              FROM summaries s WHERE s.thread_id = p_thread ORDER BY s.end_seq DESC LIMIT 1;
            -- The prompt as build_prompt makes it: the system prompt (and the reply's priming),
            -- the summary if any, then the newest turns while they fit.
            v_used := p_head_tokens;
            IF v_summary IS NOT NULL AND v_summary <> '' THEN
                IF v_summary_tokens IS NULL THEN
                    v_fits := false;
                ELSE
                    v_used := v_used + p_summary_overhead + v_summary_tokens;
                END IF;
            END IF;
            IF v_fits AND p_refuse IS NULL THEN
                FOR r IN SELECT x.role, x.content_tokens FROM messages x
                          WHERE x.thread_id = p_thread AND x.seq > COALESCE(v_summary_end, 0)
                            AND x.seq <= m.seq AND x.deleted_at IS NULL
                            AND x.role IN ('user', 'assistant') AND x.content <> ''
                          ORDER BY x.seq DESC LIMIT p_history LOOP
                    v_read := v_read + 1;
                    IF r.content_tokens IS NULL THEN
                        v_fits := false;
                        EXIT;
                    END IF;
                    v_cost := CASE WHEN r.role = 'assistant' THEN p_assistant_overhead
                                   ELSE p_user_overhead END + r.content_tokens;
                    IF v_used + v_cost > p_prompt_budget THEN
                        -- The newest turn alone too long: build_prompt cuts it (Python).
                        v_fits := v_n > 0;
                        v_whole := false;
                        EXIT;
                    END IF;
                    v_used := v_used + v_cost;
                    v_n := v_n + 1;
                END LOOP;
                v_whole := v_whole AND v_read < p_history;
            END IF;
            IF NOT v_fits THEN
                v_reply := 'fallback';
                -- What tl_start_reply's caller builds the prompt from (as 0013).
                SELECT COALESCE(jsonb_agg(jsonb_build_array(x.role, x.content) ORDER BY x.seq DESC),
                                '[]'::jsonb) INTO v_turns
                  FROM (SELECT x.seq, x.role, x.content FROM messages x
                         WHERE x.thread_id = p_thread AND x.seq > COALESCE(v_summary_end, 0)
                           AND x.seq <= m.seq AND x.deleted_at IS NULL
                           AND x.role IN ('user', 'assistant') AND x.content <> ''
                         ORDER BY x.seq DESC LIMIT p_history) x;
            ELSE
                SELECT COALESCE(jsonb_agg(jsonb_build_array(x.role, x.content) ORDER BY x.seq DESC),
                                '[]'::jsonb) INTO v_turns
                  FROM (SELECT x.seq, x.role, x.content FROM messages x
                         WHERE x.thread_id = p_thread AND x.seq > COALESCE(v_summary_end, 0)
                           AND x.seq <= m.seq AND x.deleted_at IS NULL
                           AND x.role IN ('user', 'assistant') AND x.content <> ''
                         ORDER BY x.seq DESC LIMIT v_n) x;
                IF p_refuse IS NULL THEN
                    -- pricing.reply_estimate_usd: rounded up to a millionth.
                    v_reserve := ceil((v_used * p_price_prompt
                                       + p_max_reply * p_price_completion) * 1000) / 1000000;
                END IF;
                SELECT i.outcome, i.message INTO v_reply, v_reply_message
                  FROM tl_insert_reply(p_thread, t.project_id, m.seq + 1, m.id, p_model,
                                       v_reserve, p_claimed_by, p_refuse, p_refuse_text,
                                       p_budget_text) i;
            END IF;
        END IF;
    END IF;
    RETURN QUERY SELECT 'created'::text, t.project_id, m.seq, v_payload::text,
                        NULL::numeric, NULL::numeric, v_summary, v_turns,
                        v_reply, v_reply_message,
                        CASE WHEN v_reply = 'fallback' THEN NULL ELSE v_used END,
                        v_reserve, v_whole;
END $$;
"""

DOWNGRADE = r"""
DROP FUNCTION tl_send_and_start(uuid, uuid, text, text, boolean, integer, integer, integer,
                                integer, integer, integer, integer, numeric, numeric, integer,
                                text, uuid, text, text, text);
DROP FUNCTION tl_finish_reply(uuid, uuid, uuid, text, text, text, text, jsonb, integer, integer,
                              numeric, boolean, integer);
DROP TRIGGER messages_tokens_stale ON messages;
DROP FUNCTION tl_messages_tokens_stale();
ALTER TABLE summaries DROP COLUMN content_tokens;
ALTER TABLE messages DROP COLUMN content_tokens;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
