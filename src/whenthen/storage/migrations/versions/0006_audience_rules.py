"""Audience changes made outside the pipeline, tag rules, and decay timers for scores.

* ``profile_rechecks``: people whose lists, tags, stage or traits changed outside the
  event pipeline (admin API, CSV import, journey actions, tag rules); a worker step
  re-evaluates their segments.
* ``tag_rules``: add or remove a tag when an event (with filters) happens and an optional
  condition holds.
* ``score_timers``: when decay alone will carry a score across a threshold.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "profile_rechecks",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "profile_id", name=op.f("pk_profile_rechecks")),
    )
    op.create_index("ix_profile_rechecks_queued", "profile_rechecks", ["queued_at"], unique=False)
    op.create_table(
        "tag_rules",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("definition", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "key", name=op.f("pk_tag_rules")),
    )
    op.create_table(
        "score_timers",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("model_key", sa.String(length=80), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "profile_id", "model_key", name=op.f("pk_score_timers")),
    )
    op.create_index("ix_score_timers_due", "score_timers", ["due_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_score_timers_due", table_name="score_timers")
    op.drop_table("score_timers")
    op.drop_table("tag_rules")
    op.drop_index("ix_profile_rechecks_queued", table_name="profile_rechecks")
    op.drop_table("profile_rechecks")
