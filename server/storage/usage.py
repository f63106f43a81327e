"""Spend and token usage per project: what budgets are checked against and what usage reports.

Both read ``project_usage_ledger`` (migration 0002): reply usage rows plus summary costs, so every
call to the model counts, whichever part of the server made it.

"This month" is the current calendar month in UTC. Spend counts recorded usage plus the money
reserved for replies still in flight (``budget_reservations``), so concurrent sends cannot
overshoot a budget by the cost of the replies being generated.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from server.db import Tx

# The start of the current calendar month in UTC, as SQL.
MONTH_START_SQL = "date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
_MONTH_START = MONTH_START_SQL


async def project_spend_this_month(tx: Tx, project_id: str) -> Decimal:
    """USD spent by ``project_id`` this month (UTC), reservations for replies in flight included.

    ``tl_project_spend`` (migration 0006) is the one definition, shared with ``tl_send_message``.
    """
    return Decimal(await tx.fetchval("SELECT tl_project_spend($1)", project_id))


async def project_usage(tx: Tx, project_id: str) -> dict[str, Any]:
    """Tokens and cost of ``project_id``: this month, all time, and all time per model."""
    month = await tx.fetchrow(
        f"""
        SELECT COALESCE(sum(prompt_tokens), 0) AS prompt_tokens,
               COALESCE(sum(completion_tokens), 0) AS completion_tokens,
               COALESCE(sum(cost_usd), 0) AS cost_usd
          FROM project_usage_ledger WHERE project_id = $1 AND created_at >= {_MONTH_START}
        """,
        project_id,
    )
    total = await tx.fetchrow(
        """
        SELECT COALESCE(sum(prompt_tokens), 0) AS prompt_tokens,
               COALESCE(sum(completion_tokens), 0) AS completion_tokens,
               COALESCE(sum(cost_usd), 0) AS cost_usd
          FROM project_usage_ledger WHERE project_id = $1
        """,
        project_id,
    )
    by_model = await tx.fetch(
        """
        SELECT model, sum(prompt_tokens) AS prompt_tokens,
               sum(completion_tokens) AS completion_tokens, sum(cost_usd) AS cost_usd
          FROM project_usage_ledger WHERE project_id = $1
         GROUP BY model ORDER BY model
        """,
        project_id,
    )
    return {
        "month": _usage(month),
        "total": _usage(total),
        "by_model": [{"model": row["model"], **_usage(row)} for row in by_model],
    }


def _usage(row: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": int(row["prompt_tokens"]),
        "completion_tokens": int(row["completion_tokens"]),
        "cost_usd": float(row["cost_usd"]),
    }
