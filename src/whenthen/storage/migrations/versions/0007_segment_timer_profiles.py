"""Segment timers found by profile (the pipeline reads a person's timers for every event);
open segment stays found by segment and profile (a million people leaving at once).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_segment_timers_profile", "segment_timers", ["workspace_id", "profile_id"], unique=False
    )
    op.create_index(
        "ix_segment_history_open",
        "segment_history",
        ["segment_id", "profile_id"],
        unique=False,
        sqlite_where=sa.text("exited_at IS NULL"),
        postgresql_where=sa.text("exited_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_segment_history_open", table_name="segment_history")
    op.drop_index("ix_segment_timers_profile", table_name="segment_timers")
