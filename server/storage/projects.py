"""SQL for projects. Every read is scoped to the owner: another user's project does not exist."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from server.db import Record, Tx

# The spend this month is computed with the row so a list costs one query.
_COLUMNS = """
    p.id, p.owner_id, p.name, p.monthly_budget_usd, p.created_at, p.updated_at,
    tl_project_spend(p.id) AS spend_this_month_usd
"""


async def insert_project(
    tx: Tx, owner_id: str, name: str, monthly_budget_usd: Decimal | None
) -> Record:
    """Create a project and return it with its (zero) spend."""
    row = await tx.fetchrow(
        f"""
        WITH p AS (
            INSERT INTO projects (owner_id, name, monthly_budget_usd) VALUES ($1, $2, $3)
            RETURNING *
        )
        SELECT {_COLUMNS} FROM p
        """,
        owner_id,
        name,
        monthly_budget_usd,
    )
    assert row is not None
    return row


async def get_project(
    tx: Tx, owner_id: str, project_id: str, *, for_update: bool = False
) -> Record | None:
    """The project if ``owner_id`` owns it, else None."""
    lock = "FOR UPDATE OF p" if for_update else ""
    return await tx.fetchrow(
        f"SELECT {_COLUMNS} FROM projects p WHERE p.id = $1 AND p.owner_id = $2 {lock}",
        project_id,
        owner_id,
    )


async def monthly_budget(tx: Tx, project_id: str) -> Decimal | None:
    """The project's monthly budget in USD (None: no limit)."""
    value = await tx.fetchval("SELECT monthly_budget_usd FROM projects WHERE id = $1", project_id)
    return None if value is None else Decimal(value)


async def update_project(
    tx: Tx,
    project_id: str,
    *,
    name: str,
    monthly_budget_usd: Decimal | None,
) -> Record:
    """Write the full set of editable fields (the caller merged the patch) and return the row."""
    row = await tx.fetchrow(
        f"""
        WITH p AS (
            UPDATE projects SET name = $2, monthly_budget_usd = $3, updated_at = clock_timestamp()
             WHERE id = $1 RETURNING *
        )
        SELECT {_COLUMNS} FROM p
        """,
        project_id,
        name,
        monthly_budget_usd,
    )
    assert row is not None
    return row


async def delete_project(tx: Tx, owner_id: str, project_id: str) -> bool:
    """Delete the project and everything in it; False if it is not the owner's."""
    status = await tx.execute(
        "DELETE FROM projects WHERE id = $1 AND owner_id = $2", project_id, owner_id
    )
    return status == "DELETE 1"


async def list_projects(
    tx: Tx, owner_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[Record]:
    """Up to ``limit`` projects of ``owner_id`` ordered by (created_at, id), after the keyset."""
    if after is None:
        return await tx.fetch(
            f"""SELECT {_COLUMNS} FROM projects p WHERE p.owner_id = $1
                ORDER BY p.created_at, p.id LIMIT $2""",
            owner_id,
            limit,
        )
    return await tx.fetch(
        f"""SELECT {_COLUMNS} FROM projects p
             WHERE p.owner_id = $1 AND (p.created_at, p.id) > ($2, $3)
             ORDER BY p.created_at, p.id LIMIT $4""",
        owner_id,
        after[0],
        after[1],
        limit,
    )
