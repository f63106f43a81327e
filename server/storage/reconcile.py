"""Counter reconciliation: find drift between thread counters and the rows they summarise.

Triggers keep ``threads.last_seq``, ``message_count`` and ``last_message_at`` right; this job is
the safety net (a restore from backup, a manual fix, a future bug). It repairs in one transaction
and reports how many threads drifted on each counter.
"""

from __future__ import annotations

from server.db import Database

_DRIFT = """
WITH truth AS (
    SELECT t.id,
           COALESCE((SELECT max(e.seq) FROM thread_events e
                      WHERE e.thread_id = t.id), 0) AS last_seq,
           (SELECT count(*) FROM messages m
             WHERE m.thread_id = t.id AND m.deleted_at IS NULL)::int AS message_count,
           (SELECT max(m.created_at) FROM messages m WHERE m.thread_id = t.id) AS last_message_at
      FROM threads t
)
SELECT t.id,
       t.last_seq <> truth.last_seq AS seq_drift,
       t.message_count <> truth.message_count AS count_drift,
       t.last_message_at IS DISTINCT FROM truth.last_message_at AS time_drift,
       truth.last_seq, truth.message_count, truth.last_message_at
  FROM threads t JOIN truth ON truth.id = t.id
 WHERE t.last_seq <> truth.last_seq
    OR t.message_count <> truth.message_count
    OR t.last_message_at IS DISTINCT FROM truth.last_message_at
   FOR UPDATE OF t
"""

_REPAIR = """
UPDATE threads SET last_seq = $2, message_count = $3, last_message_at = $4 WHERE id = $1
"""


async def reconcile(db: Database) -> dict[str, int]:
    """Repair counter drift; return ``{"threads_checked", "last_seq", "message_count", ...}``."""
    async with db.transaction() as tx:
        checked = await tx.fetchval("SELECT count(*) FROM threads")
        rows = await tx.fetch(_DRIFT)
        if rows:
            await tx.executemany(
                _REPAIR,
                [(r["id"], r["last_seq"], r["message_count"], r["last_message_at"]) for r in rows],
            )
    return {
        "threads_checked": int(checked),
        "threads_repaired": len(rows),
        "last_seq": sum(bool(r["seq_drift"]) for r in rows),
        "message_count": sum(bool(r["count_drift"]) for r in rows),
        "last_message_at": sum(bool(r["time_drift"]) for r in rows),
    }
