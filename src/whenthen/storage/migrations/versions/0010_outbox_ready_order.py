"""The outbox's ready index holds the claim's whole order (``available_at, id``): a claim
reads the first ready jobs in index order and stops, whatever the backlog. On
``available_at`` alone, PostgreSQL read and sorted every ready job for each claim (110 ms
a claim of 200 at 200,000 ready jobs, a big send's backlog; 0.4 ms with this index).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_outbox_ready", table_name="outbox")
    op.create_index(
        "ix_outbox_ready",
        "outbox",
        ["available_at", "id"],
        unique=False,
        sqlite_where=sa.text("done_at IS NULL"),
        postgresql_where=sa.text("done_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_ready", table_name="outbox")
    op.create_index(
        "ix_outbox_ready",
        "outbox",
        ["available_at"],
        unique=False,
        sqlite_where=sa.text("done_at IS NULL"),
        postgresql_where=sa.text("done_at IS NULL"),
    )
