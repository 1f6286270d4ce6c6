from __future__ import annotations

from sqlalchemy import Column, Index, Integer, String, Table, UniqueConstraint, text

from whenthen.storage.metadata import BigIntPK, JsonDoc, UTCDateTime, metadata

segments = Table(
    "segments",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("key", String(80), nullable=False),
    Column("name", String(200), nullable=False),
    Column("definition", JsonDoc, nullable=False),
    # Bumped by every update: memberships are recomputed for the new definition.
    Column("version", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("workspace_id", "key", name="uq_segments_workspace_key"),
)

#: Current members of each segment.
segment_members = Table(
    "segment_members",
    metadata,
    Column("segment_id", String(40), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("since", UTCDateTime(), nullable=False),
    Index("ix_segment_members_profile", "workspace_id", "profile_id"),
)

#: When a profile's membership may change by the passage of time alone (a window ends).
segment_timers = Table(
    "segment_timers",
    metadata,
    Column("segment_id", String(40), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("due_at", UTCDateTime(), nullable=False),
    Index("ix_segment_timers_due", "due_at"),
    Index("ix_segment_timers_profile", "workspace_id", "profile_id"),
)

#: Every entry and exit, with the time.
segment_history = Table(
    "segment_history",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("segment_id", String(40), nullable=False),
    Column("workspace_id", String(40), nullable=False),
    Column("profile_id", String(40), nullable=False),
    Column("entered_at", UTCDateTime(), nullable=False),
    Column("exited_at", UTCDateTime(), nullable=True),
    Index("ix_segment_history_profile", "workspace_id", "profile_id", "entered_at"),
    Index("ix_segment_history_segment", "segment_id", "entered_at"),
    # Open stays, found by segment and profile when people leave.
    Index(
        "ix_segment_history_open",
        "segment_id",
        "profile_id",
        sqlite_where=text("exited_at IS NULL"),
        postgresql_where=text("exited_at IS NULL"),
    ),
)
