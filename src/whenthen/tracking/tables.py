from __future__ import annotations

from sqlalchemy import Column, Index, SmallInteger, String, Table, UniqueConstraint, text

from whenthen.storage.metadata import BigIntPK, JsonDoc, UTCDateTime, metadata

#: The durable event log. Ingestion appends here and nothing else; the pipeline reads the
#: pending rows of a partition in ``seq`` order and marks them processed.
events = Table(
    "events",
    metadata,
    Column("seq", BigIntPK, primary_key=True, autoincrement=True),
    Column("workspace_id", String(40), nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("type", String(16), nullable=False),
    Column("event", String(255), nullable=True),
    Column("user_id", String(255), nullable=True),
    Column("anonymous_id", String(255), nullable=True),
    Column("timestamp", UTCDateTime(), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("payload", JsonDoc, nullable=False),
    Column("partition", SmallInteger, nullable=False),
    # 0 pending, 1 processed, 3 failed (parked after repeated errors; see the pipeline)
    Column("state", SmallInteger, nullable=False, server_default=text("0")),
    Column("profile_id", String(40), nullable=True),
    UniqueConstraint("workspace_id", "message_id", name="uq_events_workspace_message"),
    Index(
        "ix_events_pending",
        "partition",
        "seq",
        sqlite_where=text("state = 0"),
        postgresql_where=text("state = 0"),
    ),
    Index("ix_events_profile_time", "profile_id", "timestamp", "seq"),
    # whole-population segment queries: the rows of one event name in a window (0008)
    Index("ix_events_workspace_event_time", "workspace_id", "event", "timestamp"),
)
