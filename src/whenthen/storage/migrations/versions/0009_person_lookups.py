"""A person's rows found by index on a merge and an erasure: the tombstones redirecting
to a profile (a merge flattens chains; they were a scan of every profile per merge), and
the merge records naming a profile as the merged-away one (an erasure).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_profiles_merged_into",
        "profiles",
        ["merged_into", "workspace_id"],
        unique=False,
        sqlite_where=sa.text("merged_into IS NOT NULL"),
        postgresql_where=sa.text("merged_into IS NOT NULL"),
    )
    op.create_index(
        "ix_profile_merges_from", "profile_merges", ["workspace_id", "from_profile_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_profile_merges_from", table_name="profile_merges")
    op.drop_index("ix_profiles_merged_into", table_name="profiles")
