"""SQL of assistant replies: their messages, budget reservations, usage rows and summaries.

Lock order, the same as every writer of a thread: the thread row (``threads.lock_next_seq``)
first, then the project row (only when it has a budget), then message rows. A reply writes in
two short transactions, one to start (message + ``message.created`` + reservation) and one to
finish (final content and status + its ``assistant.*`` event + usage row, reservation
released: ``tl_finish_reply``, one statement); in between only unversioned progress saves touch
the streaming message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from server.db import Record, TransactionTx, Tx
from server.storage.usage import project_spend_this_month

# How far back a prompt may look, in messages; the token budget usually stops it sooner.
HISTORY_LIMIT = 400


async def lock_for_reply(tx: Tx, thread_id: str, project_id: str, message_id: str) -> Record | None:
    """Lock the thread row until commit and read, in one round trip, what a reply starts from.

    Columns: ``seq`` (the next event seq), ``monthly_budget_usd``, ``asked`` (the content of the
    message being answered, None if it is gone or deleted), ``summary`` and ``summary_end_seq`` (the
    latest summary, None if there is none), ``turns``: ``[[role, content], ...]``, newest first,
    the messages ``recent_turns`` would return (after the summary, before ``seq``), and
    ``streaming``: the id of the thread's reply being generated, on any node, None if there is
    none. None if the thread or project is gone.
    """
    return await tx.fetchrow(
        """SELECT t.last_seq + 1 AS seq, p.monthly_budget_usd,
                  (SELECT m.content FROM messages m
                    WHERE m.id = $3 AND m.thread_id = t.id AND m.deleted_at IS NULL) AS asked,
                  s.content AS summary, s.end_seq AS summary_end_seq,
                  (SELECT COALESCE(jsonb_agg(jsonb_build_array(r.role, r.content)
                                             ORDER BY r.seq DESC), '[]'::jsonb)
                     FROM (SELECT seq, role, content FROM messages
                            WHERE thread_id = t.id AND seq > COALESCE(s.end_seq, 0)
                              AND seq <= t.last_seq AND deleted_at IS NULL
                              AND role IN ('user', 'assistant') AND content <> ''
                            ORDER BY seq DESC LIMIT $4) r) AS turns,
                  (SELECT g.id FROM messages g
                    WHERE g.thread_id = t.id AND g.status = 'streaming') AS streaming
             FROM threads t
             JOIN projects p ON p.id = t.project_id AND p.id = $2
             LEFT JOIN LATERAL (SELECT content, end_seq FROM summaries
                                 WHERE thread_id = t.id ORDER BY end_seq DESC LIMIT 1) s ON true
            WHERE t.id = $1
              FOR UPDATE OF t""",
        thread_id,
        project_id,
        message_id,
        HISTORY_LIMIT,
    )


async def insert_reply_and_commit(
    tx: TransactionTx,
    *,
    thread_id: str,
    project_id: str,
    seq: int,
    reply_to: str,
    model: str,
    reserve_usd: Decimal,
    claimed_by: str | None,
    refuse: str | None,
    refuse_text: str | None,
    budget_text: str,
    before_commit: Callable[[tuple[str, str]], None] | None = None,
) -> tuple[str, str]:
    """End the reply's start transaction (``tl_insert_reply``, then COMMIT, in one trip): check a
    budgeted project's month under its row lock (refused: ``budget_exceeded``), then write the
    assistant message at ``seq`` (``streaming`` and claimed by ``claimed_by``; ``failed`` when
    refused), its ``message.created`` event and either the reservation of ``reserve_usd`` or,
    refused (``refuse``, decided before, or the budget), its ``assistant.failed`` event at
    ``seq + 1`` with ``refuse_text`` / ``budget_text`` as its message.

    Returns ``(outcome, message)``: ``"started"`` or the refusal, and the message as JSON text
    (``message_to_dict``'s, the event's payload). ``before_commit`` gets the same pair as soon
    as the statement has answered, while the COMMIT is on its way (see
    ``TransactionTx.commit_with``).
    """

    def pair(row: Record) -> tuple[str, str]:
        return str(row["outcome"]), str(row["message"])

    hook: Callable[[Any], None] | None = None
    if before_commit is not None:
        then = before_commit

        def hook(row: Any) -> None:
            then(pair(row))

    row = await tx.commit_with(
        "fetchrow",
        "SELECT outcome, message FROM tl_insert_reply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        thread_id,
        project_id,
        seq,
        reply_to,
        model,
        reserve_usd,
        claimed_by,
        refuse,
        refuse_text,
        budget_text,
        before_commit=hook,
    )
    return pair(row)


async def start_reply(
    tx: Tx,
    *,
    thread_id: str,
    project_id: str,
    seq: int,
    reply_to: str,
    model: str,
    reserve_usd: Decimal,
    claimed_by: str | None,
    refuse: str | None,
    refuse_text: str | None,
    budget_text: str,
) -> tuple[str, str | None]:
    """A reply's whole start from the history its send read (``tl_start_reply``, migration
    0013), one statement: run it on ``Database.atomic`` (BEGIN, it and COMMIT in one trip).

    Locks the thread; writes nothing and answers ``stale`` if anything was written in it since
    ``seq`` was read (the reply would not be at ``seq``), ``busy`` if one of its replies is
    streaming, ``not_found`` if it is gone; else does what ``insert_reply_and_commit`` does and
    answers the same ``(outcome, message)``.
    """
    row = await tx.fetchrow(
        "SELECT outcome, message FROM tl_start_reply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        thread_id,
        project_id,
        seq,
        reply_to,
        model,
        reserve_usd,
        claimed_by,
        refuse,
        refuse_text,
        budget_text,
    )
    assert row is not None
    message = row["message"]
    return str(row["outcome"]), None if message is None else str(message)


async def latest_summary(tx: Tx, thread_id: str, before_seq: int | None = None) -> Record | None:
    """The newest summary of the thread (covering messages up to ``end_seq``)."""
    return await tx.fetchrow(
        """SELECT id, content, start_seq, end_seq, start_message_id, end_message_id
             FROM summaries WHERE thread_id = $1 AND ($2::bigint IS NULL OR end_seq < $2)
            ORDER BY end_seq DESC LIMIT 1""",
        thread_id,
        before_seq,
    )


async def save_progress(tx: Tx, message_id: str, content: str) -> bool:
    """Store the text so far of a streaming reply, unversioned (the trigger allows it while
    the status is ``streaming``). False if the message is no longer streaming or was deleted."""
    status = await tx.execute(
        """UPDATE messages SET content = $2
            WHERE id = $1 AND status = 'streaming' AND deleted_at IS NULL AND content <> $2""",
        message_id,
        content,
    )
    return status.endswith(" 1")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """What one assistant message cost: its ``usage_records`` row (at most one per message)."""

    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    estimated: bool


async def finish_reply(
    tx: Tx,
    *,
    thread_id: str,
    project_id: str,
    message_id: str,
    status: str,
    content: str | None,
    model: str | None,
    event_type: str,
    payload: dict[str, Any],
    usage: UsageRow | None,
    content_tokens: int | None = None,
) -> tuple[int, str] | None:
    """End a reply in one statement (``tl_finish_reply``, migration 0012): lock the thread, set
    the final status and content (``content`` None keeps the text saved so far, and the event's
    ``content`` becomes that text), release the reservation, write ``usage`` (model ``model``)
    and the closing event ``event_type`` / ``payload`` at the thread's next seq.

    Returns the event's seq and the message's final content, or None if the reply is no longer
    streaming: another node took this one for dead and ended it (its closing event is written
    already; the usage row, spent either way, is still written). A message the user deleted
    meanwhile keeps its tombstone (only its status changes). ``LookupError`` if the thread is
    gone (nothing written). Run on ``db.atomic``, the thread row is held only while the
    database runs the statement and its COMMIT. ``content_tokens`` (``content``'s tokens as
    the prompt builder counts them) is stored with the final text (migration 0014), so the
    next send can start its reply in its own statement.
    """
    args: tuple[Any, ...] = ()
    sql = "SELECT * FROM tl_finish_reply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    if content_tokens is not None and content is not None:
        args = (content_tokens,)
        sql = sql.replace("$12)", "$12, $13)")
    row = await tx.fetchrow(
        sql,
        thread_id,
        project_id,
        message_id,
        status,
        content,
        model,
        event_type,
        payload,
        None if usage is None else usage.prompt_tokens,
        None if usage is None else usage.completion_tokens,
        None if usage is None else usage.cost_usd,
        None if usage is None else usage.estimated,
        *args,
    )
    assert row is not None
    if row["outcome"] == "not_found":
        raise LookupError(thread_id)
    if row["outcome"] == "claim_lost":
        return None
    return int(row["seq"]), str(row["content"])


# -- summaries ---------------------------------------------------------------------------------


async def unsummarised_size(tx: Tx, thread_id: str) -> tuple[int, int]:
    """(messages, UTF-8 bytes) after the latest summary: a cheap upper bound on their tokens
    (a cl100k token always covers at least one byte), checked before loading any content."""
    row = await tx.fetchrow(
        """SELECT count(*) AS n, COALESCE(sum(octet_length(content)), 0) AS bytes
             FROM messages
            WHERE thread_id = $1 AND deleted_at IS NULL AND role IN ('user', 'assistant')
              AND status <> 'streaming' AND content <> ''
              AND seq > COALESCE((SELECT max(end_seq) FROM summaries WHERE thread_id = $1), 0)""",
        thread_id,
    )
    assert row is not None
    return int(row["n"]), int(row["bytes"])


async def unsummarised_turns(tx: Tx, thread_id: str, after_seq: int) -> list[Record]:
    """Finished, non-deleted user/assistant messages after ``after_seq``, oldest first.

    Stops before a reply still streaming, so a summary never ends past a message it could not
    include (that message would otherwise vanish from later prompts).
    """
    return await tx.fetch(
        """SELECT id, seq, role, content FROM messages
            WHERE thread_id = $1 AND seq > $2 AND deleted_at IS NULL
              AND role IN ('user', 'assistant') AND status <> 'streaming' AND content <> ''
              AND seq < COALESCE((SELECT min(seq) FROM messages
                                   WHERE thread_id = $1 AND status = 'streaming'),
                                 9223372036854775807)
            ORDER BY seq""",
        thread_id,
        after_seq,
    )


async def try_lock_summary(tx: Tx, thread_id: str) -> bool:
    """Take the thread's summary lock until commit, without waiting; False if it is held."""
    return bool(
        await tx.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext('threadline.summary'), hashtext($1))",
            thread_id,
        )
    )


async def insert_summary(
    tx: Tx,
    *,
    thread_id: str,
    start: Record,
    end: Record,
    content: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cost_usd: Decimal,
    estimated: bool,
    content_tokens: int | None = None,
) -> Record | None:
    """Store a summary of messages ``start``..``end`` and what it cost (charged to the project
    through ``project_usage_ledger``); None if that window is already summarised.
    ``content_tokens``: the summary's prompt message's tokens (``prompt.summary_tokens``)."""
    return await tx.fetchrow(
        """INSERT INTO summaries (thread_id, start_message_id, end_message_id, start_seq, end_seq,
                                  content, model, prompt_tokens, completion_tokens, cost_usd,
                                  estimated, content_tokens)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
           ON CONFLICT (thread_id, start_message_id) DO NOTHING
           RETURNING id, start_seq, end_seq, start_message_id, end_message_id, created_at""",
        thread_id,
        start["id"],
        end["id"],
        start["seq"],
        end["seq"],
        content,
        model,
        prompt_tokens,
        completion_tokens,
        cost_usd,
        estimated,
        content_tokens,
    )


async def project_budget_left(tx: Tx, thread_id: str) -> Decimal | None:
    """USD the thread's project may still spend this month; None when it has no budget."""
    row = await tx.fetchrow(
        """SELECT p.id, p.monthly_budget_usd FROM threads t JOIN projects p ON p.id = t.project_id
            WHERE t.id = $1""",
        thread_id,
    )
    if row is None or row["monthly_budget_usd"] is None:
        return None
    spent = await project_spend_this_month(tx, str(row["id"]))
    return Decimal(row["monthly_budget_usd"]) - spent


# -- recovery ----------------------------------------------------------------------------------


async def stale_streaming(
    tx: Tx, *, node_timeout_s: float, unclaimed_older_than_s: float, limit: int = 100
) -> list[Record]:
    """Replies still ``streaming`` that no live process is generating.

    A claimed reply is dead when its node's row has not been refreshed for ``node_timeout_s``
    (or is gone: a restart is a new incarnation). An unclaimed one (written by a version before
    claims) is dead once older than ``unclaimed_older_than_s``.
    """
    return await tx.fetch(
        """SELECT m.id, m.thread_id, t.project_id, m.claimed_by FROM messages m
             JOIN threads t ON t.id = m.thread_id
            WHERE m.status = 'streaming'
              AND CASE WHEN m.claimed_by IS NULL
                       THEN m.created_at < now() - make_interval(secs => $2)
                       ELSE NOT EXISTS (
                           SELECT 1 FROM nodes n
                            WHERE n.incarnation = m.claimed_by
                              AND n.last_seen_at > now() - make_interval(secs => $1))
                  END
            ORDER BY m.created_at LIMIT $3""",
        node_timeout_s,
        unclaimed_older_than_s,
        limit,
    )


async def streaming_reply(tx: Tx, thread_id: str) -> Record | None:
    """The thread's reply being generated (``id``, ``claimed_by``), if any, on any node."""
    return await tx.fetchrow(
        "SELECT id, claimed_by FROM messages WHERE thread_id = $1 AND status = 'streaming'",
        thread_id,
    )
