"""Cluster membership: one row per running ``threadline serve`` process (a node incarnation).

Each process inserts its row when it starts (a fresh ``incarnation`` uuid, with its
``THREADLINE_NODE_ID``), refreshes ``last_seen_at`` every ``THREADLINE_NODE_TIMEOUT_S / 3`` and
deletes the row when it stops cleanly. A node is live while ``last_seen_at`` is younger than the
timeout, measured on the database's clock (never the nodes' own, which may disagree). A restart
is a new incarnation, so work claimed by the previous one is known to be dead at once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE nodes (
    incarnation  uuid PRIMARY KEY,
    node_id      text NOT NULL CONSTRAINT nodes_node_id_check CHECK (node_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    host         text NOT NULL CHECK (length(host) <= 255),
    pid          integer NOT NULL CHECK (pid > 0),
    url          text CHECK (length(url) <= 500),
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    draining     boolean NOT NULL DEFAULT false,
    CONSTRAINT nodes_seen_after_start CHECK (last_seen_at >= started_at)
);
CREATE INDEX nodes_last_seen_idx ON nodes (last_seen_at);
"""

DOWNGRADE = r"""
DROP TABLE nodes;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
