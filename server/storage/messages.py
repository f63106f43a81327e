"""SQL for messages and their audit trail (``message_edits``, written by the table's trigger).

Inserts take the seq the caller obtained from ``threads.lock_next_seq`` and must be followed, in
the same transaction, by the ``message.created`` event at that seq (a deferred constraint
trigger checks it at commit). Edits and deletes bump ``version`` by exactly one; the trigger
records who (``threadline.actor_id``), when, the old and the new content. Sends, edits and
deletes are each one statement (``tl_send_message``, ``tl_change_message``): the thread row is
locked only while the database runs it.
"""

from __future__ import annotations

from server.db import Record, Tx
from server.services import ReplyStart

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
    tx: Tx,
    *,
    author_id: str,
    thread_id: str,
    content: str,
    client_msg_id: str | None,
    reply: bool,
    history: int | None = None,
) -> Record:
    """A user's send in one statement (``tl_send_message``, migrations 0006 and 0013).

    Columns: ``outcome`` (``created``, ``existing``, ``conflict``, ``not_found`` or
    ``budget_exceeded``), ``project_id``, ``seq``, ``message`` (the message as JSON text, exactly
    ``message_to_dict``'s, also the ``message.created`` payload when created), ``budget`` and
    ``spent`` (for ``budget_exceeded``). Only ``created`` writes anything: the message and its
    event, in the statement's own transaction. With ``reply`` and ``history`` (a number of
    turns), a created message also comes with what its reply's prompt is built from, read under
    the same thread lock: ``summary`` (the latest, or None) and ``turns`` (``[[role, content],
    ...]``, newest first, at most ``history``, the new message first), as ``lock_for_reply``.
    """
    row = await tx.fetchrow(
        "SELECT * FROM tl_send_message($1, $2, $3, $4, $5, $6)",
        author_id,
        thread_id,
        content,
        client_msg_id,
        reply,
        history if reply else None,
    )
    assert row is not None
    return row


async def send_and_start(
    tx: Tx,
    *,
    author_id: str,
    thread_id: str,
    content: str,
    client_msg_id: str | None,
    reply: bool,
    history: int,
    start: ReplyStart,
) -> Record:
    """A user's send and, with ``reply`` and ``start.start``, its reply's start, in one
    statement (``tl_send_and_start``, migration 0014); run it on ``Database.atomic``.

    The columns of ``send``, plus ``reply``: None (no reply asked, or ``start.start`` False, or
    nothing written), ``started`` or a refusal (``budget_exceeded``, ``start.refuse``: the
    assistant message, its event and the reservation or the refusal's event are written in the
    same transaction; ``reply_message`` is the message as JSON text), ``busy`` (a reply of the
    thread is streaming) or ``fallback`` (a stored token count is missing, or the newest turn
    alone does not fit: ``summary`` and ``turns`` are then what ``send`` with ``history``
    returns). For a started reply ``summary`` and ``turns`` are the prompt's (the turns that
    fit, newest first), ``prompt_tokens`` its count, ``reserve`` the reservation and ``whole``
    whether no turn since the summary was left out. The sent message's ``content_tokens`` is
    ``start.tokens``.
    """
    row = await tx.fetchrow(
        """SELECT * FROM tl_send_and_start($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                                           $13, $14, $15, $16, $17, $18, $19, $20)""",
        author_id,
        thread_id,
        content,
        client_msg_id,
        reply,
        start.tokens,
        history,
        start.head_tokens,
        start.summary_overhead,
        start.user_overhead,
        start.assistant_overhead,
        start.prompt_budget,
        start.price_prompt,
        start.price_completion,
        start.max_reply,
        start.model if start.start else None,
        start.claimed_by,
        start.refuse,
        start.refuse_text,
        start.budget_text,
    )
    assert row is not None
    return row


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


async def change(
    tx: Tx, *, actor_id: str, message_id: str, expected_version: int, content: str | None
) -> Record:
    """Edit (``content``) or delete (``content`` None: a tombstone) a message in one statement
    (``tl_change_message``, migration 0012), as ``actor_id``, who must own it.

    The function locks the thread row then the message row (the order every writer uses),
    checks ``expected_version``, takes version + 1 and the thread's next seq for the
    ``message.updated`` / ``message.deleted`` event; the audit trail is written by the table's
    trigger with ``actor_id`` as the editor. Columns: ``outcome`` (``edited``, ``deleted``,
    ``not_found``, ``version_conflict``, ``is_deleted``, ``streaming``), ``thread_id``, ``seq``,
    ``current_version``, ``message`` (JSON text, ``message_to_dict``'s and the event's payload).
    Only ``edited`` and ``deleted`` wrote anything. A tombstone's old content survives only in
    ``message_edits`` (the history), for the owner to see.
    """
    row = await tx.fetchrow(
        "SELECT * FROM tl_change_message($1, $2, $3, $4)",
        actor_id,
        message_id,
        expected_version,
        content,
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
