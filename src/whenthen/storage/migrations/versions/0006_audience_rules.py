"""Audience changes made outside the pipeline, tag rules, and decay timers for scores.

* ``profile_rechecks``: people whose lists, tags, stage or traits changed outside the
  event pipeline (admin API, CSV import, journey actions, tag rules); a worker step
  re-evaluates their segments.
* ``tag_rules``: add or remove a tag when an event (with filters) happens and an optional
  condition holds.
* ``profile_scores.decay_due_at``: when decay alone will carry a score across a
  threshold (a worker step emits the crossing then).

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
    # When decay alone will carry the score across a threshold, and the value it was
    # decaying from when that was computed (crossings are counted from there).
    op.add_column("profile_scores", sa.Column("decay_due_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("profile_scores", sa.Column("decay_from", sa.Float(), nullable=True))
    op.create_index("ix_profile_scores_decay_due", "profile_scores", ["decay_due_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_profile_scores_decay_due", table_name="profile_scores")
    op.drop_column("profile_scores", "decay_from")
    op.drop_column("profile_scores", "decay_due_at")
    op.drop_table("tag_rules")
    op.drop_index("ix_profile_rechecks_queued", table_name="profile_rechecks")
    op.drop_table("profile_rechecks")
