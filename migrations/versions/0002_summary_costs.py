"""Summaries are charged: their cost joins the project's usage ledger and budget.

Summaries call the model too; before this, their tokens were stored but never counted towards a
project's spend. ``project_usage_ledger`` is the one place usage and budgets read from: reply
usage rows plus summary costs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE summaries
    ADD COLUMN cost_usd numeric(14, 6) NOT NULL DEFAULT 0 CONSTRAINT summaries_cost_usd_check CHECK (cost_usd >= 0),
    ADD COLUMN estimated boolean NOT NULL DEFAULT false;

CREATE VIEW project_usage_ledger AS
    SELECT u.project_id, u.model, u.prompt_tokens, u.completion_tokens, u.cost_usd, u.created_at,
           'reply'::text AS kind
      FROM usage_records u
    UNION ALL
    SELECT t.project_id, s.model, s.prompt_tokens, s.completion_tokens, s.cost_usd, s.created_at,
           'summary'::text AS kind
      FROM summaries s JOIN threads t ON t.id = s.thread_id;
"""

DOWNGRADE = r"""
DROP VIEW project_usage_ledger;
ALTER TABLE summaries DROP COLUMN estimated, DROP COLUMN cost_usd;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
