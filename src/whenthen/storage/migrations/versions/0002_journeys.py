"""Journeys, enrollments and their journal, messages and the outbox, lists, tags, consent.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consents",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "profile_id", "channel", name=op.f("pk_consents")),
    )
    op.create_table(
        "date_schedules",
        sa.Column("journey_id", sa.String(length=40), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("journey_id", "profile_id", name=op.f("pk_date_schedules")),
    )
    op.create_index("ix_date_schedules_due", "date_schedules", ["due_at"], unique=False)
    op.create_table(
        "enrollment_journal",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("journey_id", sa.String(length=40), nullable=False),
        sa.Column("enrollment_id", sa.String(length=40), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollment_journal")),
    )
    op.create_index(
        "ix_enrollment_journal_enrollment", "enrollment_journal", ["enrollment_id", "id"], unique=False
    )
    op.create_index(
        "ix_enrollment_journal_journey", "enrollment_journal", ["journey_id", "kind", "node"], unique=False
    )
    op.create_table(
        "enrollments",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("journey_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=True),
        sa.Column("wake_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("entered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("context", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("entry_key", sa.String(length=255), nullable=True),
        sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollments")),
    )
    op.create_index(
        "ix_enrollments_due",
        "enrollments",
        ["wake_at"],
        unique=False,
        sqlite_where=sa.text("status = 'active' AND wake_at IS NOT NULL"),
        postgresql_where=sa.text("status = 'active' AND wake_at IS NOT NULL"),
    )
    op.create_index(
        "ix_enrollments_journey_profile", "enrollments", ["journey_id", "profile_id"], unique=False
    )
    op.create_index(
        "ix_enrollments_profile_status", "enrollments", ["workspace_id", "profile_id", "status"], unique=False
    )
    op.create_table(
        "journey_versions",
        sa.Column("journey_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("definition", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("journey_id", "version", name=op.f("pk_journey_versions")),
    )
    op.create_table(
        "journeys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("active_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_journeys")),
        sa.UniqueConstraint("workspace_id", "key", name="uq_journeys_workspace_key"),
    )
    op.create_table(
        "list_members",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("list_key", sa.String(length=80), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "list_key", "profile_id", name=op.f("pk_list_members")),
    )
    op.create_index("ix_list_members_profile", "list_members", ["workspace_id", "profile_id"], unique=False)
    op.create_table(
        "lists",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "key", name=op.f("pk_lists")),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("journey_id", sa.String(length=40), nullable=True),
        sa.Column("enrollment_id", sa.String(length=40), nullable=True),
        sa.Column("node", sa.String(length=64), nullable=True),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("recipient", sa.String(length=2000), nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("body_html", sa.Text(), nullable=True),
        sa.Column("body_text", sa.Text(), nullable=True),
        sa.Column("links", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("response", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_messages_idempotency_key")),
    )
    op.create_index("ix_messages_journey", "messages", ["journey_id", "created_at"], unique=False)
    op.create_index(
        "ix_messages_profile", "messages", ["workspace_id", "profile_id", "created_at"], unique=False
    )
    op.create_table(
        "outbox",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("payload", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(
        "ix_outbox_ready",
        "outbox",
        ["available_at"],
        unique=False,
        sqlite_where=sa.text("done_at IS NULL"),
        postgresql_where=sa.text("done_at IS NULL"),
    )
    op.create_table(
        "profile_tags",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("profile_id", sa.String(length=40), nullable=False),
        sa.Column("tag", sa.String(length=100), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "profile_id", "tag", name=op.f("pk_profile_tags")),
    )
    op.create_index("ix_profile_tags_tag", "profile_tags", ["workspace_id", "tag"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_profile_tags_tag", table_name="profile_tags")
    op.drop_table("profile_tags")
    op.drop_index(
        "ix_outbox_ready",
        table_name="outbox",
        sqlite_where=sa.text("done_at IS NULL"),
        postgresql_where=sa.text("done_at IS NULL"),
    )
    op.drop_table("outbox")
    op.drop_index("ix_messages_profile", table_name="messages")
    op.drop_index("ix_messages_journey", table_name="messages")
    op.drop_table("messages")
    op.drop_table("lists")
    op.drop_index("ix_list_members_profile", table_name="list_members")
    op.drop_table("list_members")
    op.drop_table("journeys")
    op.drop_table("journey_versions")
    op.drop_index("ix_enrollments_profile_status", table_name="enrollments")
    op.drop_index("ix_enrollments_journey_profile", table_name="enrollments")
    op.drop_index(
        "ix_enrollments_due",
        table_name="enrollments",
        sqlite_where=sa.text("status = 'active' AND wake_at IS NOT NULL"),
        postgresql_where=sa.text("status = 'active' AND wake_at IS NOT NULL"),
    )
    op.drop_table("enrollments")
    op.drop_index("ix_enrollment_journal_journey", table_name="enrollment_journal")
    op.drop_index("ix_enrollment_journal_enrollment", table_name="enrollment_journal")
    op.drop_table("enrollment_journal")
    op.drop_index("ix_date_schedules_due", table_name="date_schedules")
    op.drop_table("date_schedules")
    op.drop_table("consents")
