from __future__ import annotations

from sqlalchemy import Column, ForeignKey, Index, String, Table

from whenthen.storage.metadata import UTCDateTime, metadata

workspaces = Table(
    "workspaces",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    # SHA-256 of the whole key; the plaintext is shown once and never stored.
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("display_prefix", String(24), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Index("ix_api_keys_workspace", "workspace_id"),
)
