"""SQL of cluster membership (the ``nodes`` table; see migration 0003).

Liveness is judged on the database's clock: a node is live while its ``last_seen_at`` is younger
than the timeout, whatever the nodes' own clocks say.
"""

from __future__ import annotations

from server.db import Database, Record

# Rows of nodes gone this long are deleted (they are kept a while for operators to see).
FORGET_AFTER_S = 3600.0

_COLUMNS = """incarnation, node_id, host, pid, url, started_at, draining,
              extract(epoch FROM now() - last_seen_at)::float8 AS seen_s_ago"""


async def beat(
    db: Database,
    *,
    incarnation: str,
    node_id: str,
    host: str,
    pid: int,
    url: str | None,
    draining: bool,
    timeout_s: float,
) -> list[Record]:
    """Insert or refresh this node's row; return every live node (this one included).

    One statement: the row written here is not visible to the statement's own SELECT, so it
    joins the live list from ``RETURNING``.
    """
    return await db.fetch(
        f"""WITH me AS (
                INSERT INTO nodes (incarnation, node_id, host, pid, url, draining)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (incarnation) DO UPDATE
                   SET last_seen_at = greatest(now(), nodes.started_at), url = EXCLUDED.url,
                       draining = EXCLUDED.draining
                RETURNING incarnation, node_id, host, pid, url, started_at, draining,
                          0.0::float8 AS seen_s_ago),
            gone AS (DELETE FROM nodes
                      WHERE last_seen_at < now() - make_interval(secs => $8) AND incarnation <> $1)
            SELECT * FROM me
            UNION ALL
            SELECT {_COLUMNS} FROM nodes
             WHERE incarnation <> $1 AND last_seen_at > now() - make_interval(secs => $7)
            ORDER BY started_at""",
        incarnation,
        node_id,
        host,
        pid,
        url,
        draining,
        timeout_s,
        FORGET_AFTER_S,
    )


async def leave(db: Database, incarnation: str) -> None:
    """Delete this node's row (a clean stop: nothing of it is left to sweep)."""
    await db.fetchval("DELETE FROM nodes WHERE incarnation = $1", incarnation)
