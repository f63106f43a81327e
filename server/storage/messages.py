"""SQL for messages and their audit trail (``message_edits``, written by the table's trigger).

Inserts take the seq the caller obtained from ``threads.lock_next_seq`` and must be followed, in
the same transaction, by the ``message.created`` event at that seq (a deferred constraint
trigger checks it at commit). Edits and deletes bump ``version`` by exactly one; the trigger
records who (``threadline.actor_id``), when, the old and the new content.
"""

from __future__ import annotations

from typing import Any

from server.db import Record, Tx

COLUMNS = """
    m.id, m.thread_id, m.seq, m.role, m.author_id, m.content, m.status, m.client_msg_id,
    m.reply_to, m.model, m.version, m.created_at, m.edited_at, m.deleted_at
"""


async def insert_message(
    tx: Tx,
    *,
    thread_id: str,
    seq: int,
    role: str,
    author_id: str | None,
    content: str,
    status: str = "completed",
    client_msg_id: str | None = None,
    reply_to: str | None = None,
    model: str | None = None,
) -> Record:
    """Insert a message at ``seq`` and return it."""
    row = await tx.fetchrow(
        f"""WITH m AS (
                INSERT INTO messages (thread_id, seq, role, author_id, content, status,
                                      client_msg_id, reply_to, model)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *)
            SELECT {COLUMNS} FROM m""",
        thread_id,
        seq,
        role,
        author_id,
        content,
        status,
        client_msg_id,
        reply_to,
        model,
    )
    assert row is not None
    return row


async def send(
    tx: Tx, *, author_id: str, thread_id: str, content: str, client_msg_id: str | None, reply: bool
) -> Record:
    """A user's send in one statement (``tl_send_message``, migration 0006).

    Columns: ``outcome`` (``created``, ``existing``, ``conflict``, ``not_found`` or
    ``budget_exceeded``), ``project_id``, ``seq``, ``message`` (the message as JSON text, exactly
    ``message_to_dict``'s, also the ``message.created`` payload when created), ``budget`` and
    ``spent`` (for ``budget_exceeded``). Only ``created`` writes anything: the message and its
    event, in the statement's own transaction.
    """
    row = await tx.fetchrow(
        "SELECT * FROM tl_send_message($1, $2, $3, $4, $5)",
        author_id,
        thread_id,
        content,
        client_msg_id,
        reply,
    )
    assert row is not None
    return row


async def owned_thread_of_message(tx: Tx, owner_id: str, message_id: str) -> Any:
    """The thread id of ``message_id`` if ``owner_id`` owns it, else None."""
    return await tx.fetchval(
        """SELECT m.thread_id FROM messages m
             JOIN threads t ON t.id = m.thread_id JOIN projects p ON p.id = t.project_id
            WHERE m.id = $1 AND p.owner_id = $2""",
        message_id,
        owner_id,
    )


async def get_message(
    tx: Tx, owner_id: str, message_id: str, *, for_update: bool = False
) -> Record | None:
    """The message if ``owner_id`` owns its thread, else None."""
    lock = "FOR UPDATE OF m" if for_update else ""
    return await tx.fetchrow(
        f"""SELECT {COLUMNS} FROM messages m
              JOIN threads t ON t.id = m.thread_id JOIN projects p ON p.id = t.project_id
             WHERE m.id = $1 AND p.owner_id = $2 {lock}""",
        message_id,
        owner_id,
    )


async def edit_message(tx: Tx, message_id: str, content: str, version: int) -> Record:
    """Replace the content, taking version ``version + 1`` (the caller checked ``version``)."""
    row = await tx.fetchrow(
        f"""WITH m AS (UPDATE messages SET content = $2, version = $3 + 1
                        WHERE id = $1 AND version = $3 RETURNING *)
            SELECT {COLUMNS} FROM m""",
        message_id,
        content,
        version,
    )
    assert row is not None
    return row


async def soft_delete_message(tx: Tx, message_id: str, version: int) -> Record:
    """Turn the message into a tombstone: content emptied, version + 1, deleted_at set.

    The old content survives only in ``message_edits`` (the history), for the owner to see.
    """
    row = await tx.fetchrow(
        f"""WITH m AS (UPDATE messages SET content = '', version = $2 + 1,
                               deleted_at = clock_timestamp()
                        WHERE id = $1 AND version = $2 RETURNING *)
            SELECT {COLUMNS} FROM m""",
        message_id,
        version,
    )
    assert row is not None
    return row


async def list_messages(
    tx: Tx,
    thread_id: str,
    *,
    after_seq: int | None = None,
    before_seq: int | None = None,
    limit: int,
) -> list[Record]:
    """Messages of a thread in ascending seq.

    With ``before_seq`` the page is the ``limit`` messages just before it (still ascending);
    otherwise the first ``limit`` messages after ``after_seq`` (0 when None).
    """
    if before_seq is not None:
        rows = await tx.fetch(
            f"""SELECT {COLUMNS} FROM messages m WHERE m.thread_id = $1 AND m.seq < $2
                 ORDER BY m.seq DESC LIMIT $3""",
            thread_id,
            before_seq,
            limit,
        )
        return list(reversed(rows))
    return await tx.fetch(
        f"""SELECT {COLUMNS} FROM messages m WHERE m.thread_id = $1 AND m.seq > $2
             ORDER BY m.seq LIMIT $3""",
        thread_id,
        after_seq or 0,
        limit,
    )


async def list_history(tx: Tx, message_id: str, after_version: int, limit: int) -> list[Record]:
    """Edits and deletes of a message in version order, after ``after_version``."""
    return await tx.fetch(
        """SELECT e.kind, e.editor_id, e.old_content, e.new_content, e.version, e.created_at
             FROM message_edits e WHERE e.message_id = $1 AND e.version > $2
            ORDER BY e.version LIMIT $3""",
        message_id,
        after_version,
        limit,
    )
