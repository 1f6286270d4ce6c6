"""Initial schema: workspaces and keys, the event log, profiles and identities, pipeline leases.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("identity_hash", sa.String(length=64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "identity_hash", name=op.f("pk_erasures")),
    )
    op.create_table(
        "events",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("event", sa.String(length=255), nullable=True),
        sa.Column("user_id", sa.String(length=255), nullable=True),
        sa.Column("anonymous_id", sa.String(length=255), nullable=True),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column("partition", sa.SmallInteger(), nullable=False),
        sa.Column("state", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_events")),
        sa.UniqueConstraint("workspace_id", "message_id", name="uq_events_workspace_message"),
    )
    op.create_index(
        "ix_events_pending",
        "events",
        ["partition", "seq"],
        unique=False,
        sqlite_where=sa.text("state = 0"),
        postgresql_where=sa.text("state = 0"),
    )
    op.create_index(
        "ix_events_profile_time",
        "events",
        ["profile_id", "timestamp", "seq"],
        unique=False,
    )
    op.create_table(
        "group_members",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("group_id", sa.String(length=255), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("joined_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "group_id", "profile_id", name=op.f("pk_group_members")),
    )
    op.create_index("ix_group_members_profile", "group_members", ["profile_id"], unique=False)
    op.create_table(
        "groups",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("group_id", sa.String(length=255), nullable=False),
        sa.Column(
            "traits",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "group_id", name=op.f("pk_groups")),
    )
    op.create_table(
        "identities",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "kind", "value", name=op.f("pk_identities")),
    )
    op.create_index("ix_identities_profile", "identities", ["profile_id"], unique=False)
    op.create_table(
        "pipeline_leases",
        sa.Column("partition", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("partition", name=op.f("pk_pipeline_leases")),
    )
    op.create_table(
        "profile_merges",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("from_profile_id", sa.String(length=40), nullable=False),
        sa.Column("into_profile_id", sa.String(length=40), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profile_merges")),
    )
    op.create_index(
        "ix_profile_merges_into",
        "profile_merges",
        ["workspace_id", "into_profile_id"],
        unique=False,
    )
    op.create_table(
        "profiles",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column(
            "traits",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "trait_times",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("event_count", sa.BigInteger(), nullable=False),
        sa.Column("merged_into", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profiles")),
    )
    op.create_index(
        "ix_profiles_workspace_email",
        "profiles",
        ["workspace_id", "email"],
        unique=False,
    )
    op.create_index(
        "ix_profiles_workspace_last_seen",
        "profiles",
        ["workspace_id", "last_seen"],
        unique=False,
    )
    op.create_index(
        "ix_profiles_workspace_phone",
        "profiles",
        ["workspace_id", "phone"],
        unique=False,
    )
    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workspaces")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("display_prefix", sa.String(length=24), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_api_keys_workspace_id_workspaces"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index("ix_api_keys_workspace", "api_keys", ["workspace_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_api_keys_workspace", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("workspaces")
    op.drop_index("ix_profiles_workspace_phone", table_name="profiles")
    op.drop_index("ix_profiles_workspace_last_seen", table_name="profiles")
    op.drop_index("ix_profiles_workspace_email", table_name="profiles")
    op.drop_table("profiles")
    op.drop_index("ix_profile_merges_into", table_name="profile_merges")
    op.drop_table("profile_merges")
    op.drop_table("pipeline_leases")
    op.drop_index("ix_identities_profile", table_name="identities")
    op.drop_table("identities")
    op.drop_table("groups")
    op.drop_index("ix_group_members_profile", table_name="group_members")
    op.drop_table("group_members")
    op.drop_index("ix_events_profile_time", table_name="events")
    op.drop_index(
        "ix_events_pending",
        table_name="events",
        sqlite_where=sa.text("state = 0"),
        postgresql_where=sa.text("state = 0"),
    )
    op.drop_table("events")
    op.drop_table("erasures")
