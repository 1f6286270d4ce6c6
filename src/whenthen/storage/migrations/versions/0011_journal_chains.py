"""The journal has no index by enrollment: each row points to its enrollment's row before
it (``prev_id``) and each enrollment to its latest row (``journal_tail``). Inserting three
entries a wake-up into ``ix_enrollment_journal_enrollment`` at random places (ids are
random) was a third of a timer batch at a million waiting (ADR 0018).

The chains of the rows already written are filled in from that index before it goes.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("enrollment_journal", sa.Column("prev_id", sa.BigInteger(), nullable=True))
    op.add_column("enrollments", sa.Column("journal_tail", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE enrollment_journal SET prev_id = (SELECT max(earlier.id) FROM enrollment_journal AS earlier"
        " WHERE earlier.enrollment_id = enrollment_journal.enrollment_id"
        " AND earlier.id < enrollment_journal.id)"
    )
    op.execute(
        "UPDATE enrollments SET journal_tail = (SELECT max(j.id) FROM enrollment_journal AS j"
        " WHERE j.enrollment_id = enrollments.id)"
    )
    op.drop_index("ix_enrollment_journal_enrollment", table_name="enrollment_journal")


def downgrade() -> None:
    op.create_index(
        "ix_enrollment_journal_enrollment", "enrollment_journal", ["enrollment_id", "id"], unique=False
    )
    op.drop_column("enrollments", "journal_tail")
    op.drop_column("enrollment_journal", "prev_id")
