from __future__ import annotations

from sqlalchemy import Column, Index, Integer, String, Table, Text, text

from whenthen.storage.metadata import BigIntPK, JsonDoc, UTCDateTime, metadata

#: Every message a journey sends (or skips), one row per idempotency key.
messages = Table(
    "messages",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("profile_id", String(40), nullable=False),
    Column("journey_id", String(40), nullable=True),
    Column("enrollment_id", String(40), nullable=True),
    Column("node", String(64), nullable=True),
    Column("channel", String(16), nullable=False),
    Column("idempotency_key", String(200), nullable=False, unique=True),
    # queued, sent, captured (no SMTP configured: kept in the local mailbox), failed, skipped
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("recipient", String(2000), nullable=True),
    Column("subject", Text, nullable=True),
    Column("body_html", Text, nullable=True),
    Column("body_text", Text, nullable=True),
    Column("links", JsonDoc, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("response", JsonDoc, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=True),
    Index("ix_messages_profile", "workspace_id", "profile_id", "created_at"),
    Index("ix_messages_journey", "journey_id", "created_at"),
)

#: Side effects to perform after the transaction that decided them commits.
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("workspace_id", String(40), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("payload", JsonDoc, nullable=False),
    Column("available_at", UTCDateTime(), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("done_at", UTCDateTime(), nullable=True),
    # The claim's whole order: the first ready jobs are read in index order, whatever
    # the backlog (migration 0010).
    Index(
        "ix_outbox_ready",
        "available_at",
        "id",
        sqlite_where=text("done_at IS NULL"),
        postgresql_where=text("done_at IS NULL"),
    ),
)
