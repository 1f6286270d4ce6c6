from __future__ import annotations

from sqlalchemy import Column, Index, String, Table

from whenthen.storage.metadata import UTCDateTime, metadata

static_lists = Table(
    "lists",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("key", String(80), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

list_members = Table(
    "list_members",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("list_key", String(80), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("added_at", UTCDateTime(), nullable=False),
    Column("source", String(100), nullable=False),
    Index("ix_list_members_profile", "workspace_id", "profile_id"),
)
