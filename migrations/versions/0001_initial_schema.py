"""Initial schema: users, projects, threads, messages, audit, event log, usage, summaries, tokens.

Every invariant the product relies on is enforced here, not only in Python.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
-- Installation-wide settings: exactly one row.
CREATE TABLE installation (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    single_user boolean NOT NULL DEFAULT false
);
INSERT INTO installation (id, single_user) VALUES (true, false);

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text NOT NULL CHECK (length(email) BETWEEN 3 AND 320 AND email ~ '^[^@\s]+@[^@\s]+$'),
    password_hash text NOT NULL CHECK (length(password_hash) > 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

-- A single-user installation refuses a second user, whatever code path inserts it.
CREATE FUNCTION tl_users_single_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT single_user FROM installation) THEN
        -- serialise concurrent registrations so two cannot both see an empty table
        LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE;
        IF EXISTS (SELECT 1 FROM users) THEN
            RAISE EXCEPTION 'single-user installation already has a user'
                USING ERRCODE = 'check_violation', CONSTRAINT = 'users_single_user';
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER users_single_user BEFORE INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION tl_users_single_user();

CREATE TABLE projects (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name               text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    monthly_budget_usd numeric(14, 4) CHECK (monthly_budget_usd >= 0),
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX projects_owner_page_idx ON projects (owner_id, created_at, id);

CREATE TABLE threads (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id      uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    title           text NOT NULL CHECK (length(title) <= 500),
    last_seq        bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    message_count   integer NOT NULL DEFAULT 0 CHECK (message_count >= 0),
    last_message_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX threads_project_page_idx ON threads (project_id, created_at, id);

CREATE TABLE messages (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    thread_id     uuid NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    seq           bigint NOT NULL CHECK (seq > 0),
    role          text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    author_id     uuid REFERENCES users (id) ON DELETE SET NULL,
    content       text NOT NULL,
    status        text NOT NULL DEFAULT 'completed'
                  CHECK (status IN ('streaming', 'completed', 'cancelled', 'failed', 'interrupted')),
    client_msg_id text CHECK (length(client_msg_id) BETWEEN 1 AND 200),
    reply_to      uuid REFERENCES messages (id) ON DELETE SET NULL,
    model         text,
    version       integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    edited_at     timestamptz,
    deleted_at    timestamptz,
    CONSTRAINT messages_thread_seq_key UNIQUE (thread_id, seq),
    CONSTRAINT messages_thread_client_msg_id_key UNIQUE (thread_id, client_msg_id),
    CONSTRAINT messages_only_assistant_streams CHECK (role = 'assistant' OR status = 'completed'),
    CONSTRAINT messages_deleted_after_created CHECK (deleted_at IS NULL OR deleted_at >= created_at)
);
CREATE INDEX messages_streaming_idx ON messages (thread_id) WHERE status = 'streaming';

-- Audit trail of every edit and delete, written by trigger so no code path can skip it.
CREATE TABLE message_edits (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  uuid NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    thread_id   uuid NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('edit', 'delete')),
    editor_id   uuid REFERENCES users (id) ON DELETE SET NULL,
    old_content text NOT NULL,
    new_content text,
    version     integer NOT NULL CHECK (version >= 2),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT message_edits_version_key UNIQUE (message_id, version),
    CONSTRAINT message_edits_delete_has_no_content CHECK ((kind = 'delete') = (new_content IS NULL))
);

CREATE FUNCTION tl_messages_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    editor uuid := NULLIF(current_setting('threadline.actor_id', true), '')::uuid;
BEGIN
    IF NEW.id <> OLD.id OR NEW.thread_id <> OLD.thread_id OR NEW.seq <> OLD.seq
       OR NEW.role <> OLD.role THEN
        RAISE EXCEPTION 'message identity columns are immutable' USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.deleted_at IS NOT NULL AND (NEW.deleted_at IS NULL OR NEW.content <> OLD.content) THEN
        RAISE EXCEPTION 'a deleted message cannot be changed' USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.version = OLD.version THEN
        -- unversioned writes are the assistant's streaming saves; never a user-visible edit
        IF NEW.deleted_at IS DISTINCT FROM OLD.deleted_at THEN
            RAISE EXCEPTION 'a delete must take a new version' USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.content <> OLD.content AND OLD.status <> 'streaming' THEN
            RAISE EXCEPTION 'an edit must take a new version' USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.version <> OLD.version + 1 THEN
        RAISE EXCEPTION 'message version must increase by one (% -> %)', OLD.version, NEW.version
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.deleted_at IS NOT NULL AND OLD.deleted_at IS NULL THEN
        INSERT INTO message_edits (message_id, thread_id, kind, editor_id, old_content, new_content, version)
        VALUES (NEW.id, NEW.thread_id, 'delete', editor, OLD.content, NULL, NEW.version);
    ELSE
        NEW.edited_at := clock_timestamp();
        INSERT INTO message_edits (message_id, thread_id, kind, editor_id, old_content, new_content, version)
        VALUES (NEW.id, NEW.thread_id, 'edit', editor, OLD.content, NEW.content, NEW.version);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER messages_guard BEFORE UPDATE ON messages
    FOR EACH ROW EXECUTE FUNCTION tl_messages_guard();

-- Thread counters follow the messages table.
CREATE FUNCTION tl_messages_counters() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE threads SET message_count = message_count + 1,
                           last_message_at = GREATEST(COALESCE(last_message_at, NEW.created_at), NEW.created_at)
         WHERE id = NEW.thread_id;
    ELSIF TG_OP = 'UPDATE' AND OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL THEN
        UPDATE threads SET message_count = message_count - 1 WHERE id = NEW.thread_id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_counters AFTER INSERT OR UPDATE OF deleted_at ON messages
    FOR EACH ROW EXECUTE FUNCTION tl_messages_counters();

-- The durable per-thread event log. seq is gap-free per thread: each insert must take exactly
-- last_seq + 1, and the trigger advances threads.last_seq in the same transaction.
CREATE TABLE thread_events (
    thread_id  uuid NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    seq        bigint NOT NULL CHECK (seq > 0),
    type       text NOT NULL CHECK (type IN ('message.created', 'message.updated', 'message.deleted',
                                             'assistant.completed', 'assistant.failed',
                                             'thread.summarized')),
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (thread_id, seq)
);

CREATE FUNCTION tl_thread_events_seq() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    next_seq bigint;
BEGIN
    UPDATE threads SET last_seq = last_seq + 1 WHERE id = NEW.thread_id RETURNING last_seq INTO next_seq;
    IF next_seq IS NULL THEN
        RAISE EXCEPTION 'thread % does not exist', NEW.thread_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF NEW.seq IS NULL THEN
        NEW.seq := next_seq;
    ELSIF NEW.seq <> next_seq THEN
        RAISE EXCEPTION 'event seq % is not the next seq % of thread %', NEW.seq, next_seq, NEW.thread_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'thread_events_gap_free';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER thread_events_seq BEFORE INSERT ON thread_events
    FOR EACH ROW EXECUTE FUNCTION tl_thread_events_seq();

CREATE FUNCTION tl_thread_events_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'thread events are append-only' USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER thread_events_immutable BEFORE UPDATE ON thread_events
    FOR EACH ROW EXECUTE FUNCTION tl_thread_events_immutable();

-- A message's seq is the seq of its message.created event (checked at commit).
CREATE FUNCTION tl_messages_have_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM thread_events
                    WHERE thread_id = NEW.thread_id AND seq = NEW.seq AND type = 'message.created') THEN
        RAISE EXCEPTION 'message % has no message.created event at seq %', NEW.id, NEW.seq
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'messages_created_event';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER messages_created_event AFTER INSERT ON messages
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tl_messages_have_event();

CREATE TABLE usage_records (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id        uuid NOT NULL UNIQUE REFERENCES messages (id) ON DELETE CASCADE,
    thread_id         uuid NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    project_id        uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    model             text NOT NULL CHECK (length(model) BETWEEN 1 AND 200),
    prompt_tokens     integer NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens integer NOT NULL CHECK (completion_tokens >= 0),
    cost_usd          numeric(14, 6) NOT NULL CHECK (cost_usd >= 0),
    estimated         boolean NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX usage_records_project_time_idx ON usage_records (project_id, created_at);

-- Money set aside for replies in flight, so concurrent sends cannot overshoot a budget.
CREATE TABLE budget_reservations (
    message_id uuid PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    amount_usd numeric(14, 6) NOT NULL CHECK (amount_usd >= 0),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX budget_reservations_project_idx ON budget_reservations (project_id);

CREATE TABLE summaries (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    thread_id        uuid NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    start_message_id uuid NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    end_message_id   uuid NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    start_seq        bigint NOT NULL CHECK (start_seq > 0),
    end_seq          bigint NOT NULL,
    content          text NOT NULL CHECK (length(content) > 0),
    model            text NOT NULL,
    prompt_tokens    integer NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens integer NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT summaries_window_key UNIQUE (thread_id, start_message_id),
    CONSTRAINT summaries_window_order CHECK (end_seq >= start_seq)
);
CREATE INDEX summaries_thread_end_idx ON summaries (thread_id, end_seq);

CREATE TABLE revoked_tokens (
    jti        text PRIMARY KEY CHECK (length(jti) BETWEEN 8 AND 128),
    user_id    uuid REFERENCES users (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX revoked_tokens_expiry_idx ON revoked_tokens (expires_at);
"""

DOWNGRADE = r"""
DROP TABLE revoked_tokens;
DROP TABLE summaries;
DROP TABLE budget_reservations;
DROP TABLE usage_records;
DROP TRIGGER messages_created_event ON messages;
DROP FUNCTION tl_messages_have_event();
DROP TABLE thread_events;
DROP FUNCTION tl_thread_events_immutable();
DROP FUNCTION tl_thread_events_seq();
DROP TABLE message_edits;
DROP TABLE messages;
DROP FUNCTION tl_messages_counters();
DROP FUNCTION tl_messages_guard();
DROP TABLE threads;
DROP TABLE projects;
DROP TABLE users;
DROP FUNCTION tl_users_single_user();
DROP TABLE installation;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
