"""Events found by workspace, name and time: whole-population segment queries (a recompute,
a preview, the timer candidates) read the rows of one event name in a window once,
instead of searching every profile's events.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_events_workspace_event_time", "events", ["workspace_id", "event", "timestamp"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_events_workspace_event_time", table_name="events")
