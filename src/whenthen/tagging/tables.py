from __future__ import annotations

from sqlalchemy import Column, String, Table

from whenthen.storage.metadata import JsonDoc, UTCDateTime, metadata

#: Tag rules of a workspace (see ``whenthen.tagging.model``).
tag_rules = Table(
    "tag_rules",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("key", String(80), primary_key=True),
    Column("definition", JsonDoc, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)
