"""SQL for threads and their durable event log (``thread_events``).

Sequence numbers: ``lock_next_seq`` takes the thread row ``FOR UPDATE`` and returns
``last_seq + 1``; the caller then appends events with consecutive seqs (the table's trigger
checks each is exactly the next one and advances ``threads.last_seq``). Holding the row lock
until commit serialises writers of one thread, so seqs commit in order with no gaps.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.db import Record, Tx

_COLUMNS = """
    t.id, t.project_id, t.title, t.last_seq, t.message_count, t.last_message_at,
    t.created_at, t.updated_at
"""


async def insert_thread(tx: Tx, project_id: str, title: str) -> Record:
    """Create a thread in ``project_id`` (the caller checked ownership)."""
    row = await tx.fetchrow(
        f"""WITH t AS (INSERT INTO threads (project_id, title) VALUES ($1, $2) RETURNING *)
            SELECT {_COLUMNS} FROM t""",
        project_id,
        title,
    )
    assert row is not None
    return row


async def get_thread(
    tx: Tx, owner_id: str, thread_id: str, *, for_update: bool = False
) -> Record | None:
    """The thread if its project belongs to ``owner_id``, else None.

    With ``for_update`` the thread row is locked until commit (see the module docstring).
    """
    lock = "FOR UPDATE OF t" if for_update else ""
    return await tx.fetchrow(
        f"""SELECT {_COLUMNS} FROM threads t JOIN projects p ON p.id = t.project_id
             WHERE t.id = $1 AND p.owner_id = $2 {lock}""",
        thread_id,
        owner_id,
    )


async def lock_next_seq(tx: Tx, thread_id: str) -> int:
    """Lock the thread row until commit and return the seq the next event must take."""
    value = await tx.fetchval(
        "SELECT last_seq + 1 FROM threads WHERE id = $1 FOR UPDATE", thread_id
    )
    if value is None:
        raise LookupError(thread_id)
    return int(value)


async def append_event(
    tx: Tx, thread_id: str, seq: int, type_: str, payload: dict[str, Any]
) -> None:
    """Append one durable event; the trigger refuses any seq but the thread's next one."""
    await tx.execute(
        "INSERT INTO thread_events (thread_id, seq, type, payload) VALUES ($1, $2, $3, $4)",
        thread_id,
        seq,
        type_,
        payload,
    )


async def update_thread(tx: Tx, thread_id: str, title: str) -> Record:
    """Rename a thread and return it."""
    row = await tx.fetchrow(
        f"""WITH t AS (UPDATE threads SET title = $2, updated_at = clock_timestamp()
                        WHERE id = $1 RETURNING *)
            SELECT {_COLUMNS} FROM t""",
        thread_id,
        title,
    )
    assert row is not None
    return row


async def delete_thread(tx: Tx, owner_id: str, thread_id: str) -> bool:
    """Delete the thread with its messages and events; False if it is not the owner's."""
    status = await tx.execute(
        """DELETE FROM threads t USING projects p
            WHERE t.id = $1 AND p.id = t.project_id AND p.owner_id = $2""",
        thread_id,
        owner_id,
    )
    return status == "DELETE 1"


async def list_threads(
    tx: Tx, project_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[Record]:
    """Up to ``limit`` threads of ``project_id`` ordered by (created_at, id), after the keyset."""
    if after is None:
        return await tx.fetch(
            f"""SELECT {_COLUMNS} FROM threads t WHERE t.project_id = $1
                ORDER BY t.created_at, t.id LIMIT $2""",
            project_id,
            limit,
        )
    return await tx.fetch(
        f"""SELECT {_COLUMNS} FROM threads t
             WHERE t.project_id = $1 AND (t.created_at, t.id) > ($2, $3)
             ORDER BY t.created_at, t.id LIMIT $4""",
        project_id,
        after[0],
        after[1],
        limit,
    )
