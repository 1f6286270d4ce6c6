from __future__ import annotations

from sqlalchemy import Column, Index, Integer, String, Table

from whenthen.storage.metadata import JsonDoc, UTCDateTime, metadata

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

#: CSV imports into lists: progress and a report of the rows that were refused.
list_imports = Table(
    "list_imports",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("list_key", String(80), nullable=False),
    # queued, running, done
    Column("status", String(16), nullable=False),
    Column("total_rows", Integer, nullable=False),
    Column("processed_rows", Integer, nullable=False),
    Column("added", Integer, nullable=False),
    Column("already_members", Integer, nullable=False),
    Column("rejected", JsonDoc, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
)
