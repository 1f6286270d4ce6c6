from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text, UniqueConstraint, text

from whenthen.storage.metadata import BigIntPK, JsonDoc, UTCDateTime, metadata

journeys = Table(
    "journeys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("key", String(80), nullable=False),
    Column("name", String(200), nullable=False),
    # draft (never published), active, paused, archived
    Column("status", String(16), nullable=False),
    Column("active_version", Integer, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("workspace_id", "key", name="uq_journeys_workspace_key"),
)

#: Every version of a definition. A published version is never changed again.
journey_versions = Table(
    "journey_versions",
    metadata,
    Column("journey_id", String(40), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("definition", JsonDoc, nullable=False),
    Column("published_at", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

enrollments = Table(
    "enrollments",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("journey_id", String(40), nullable=False),
    Column("version", Integer, nullable=False),
    Column("profile_id", String(40), nullable=False),
    Column("status", String(16), nullable=False),
    Column("node", String(64), nullable=True),
    Column("wake_at", UTCDateTime(), nullable=True),
    Column("entered_at", UTCDateTime(), nullable=False),
    Column("ended_at", UTCDateTime(), nullable=True),
    Column("steps", Integer, nullable=False),
    Column("context", JsonDoc, nullable=False),
    Column("reason", Text, nullable=True),
    Column("entry_key", String(255), nullable=True),
    Column("failures", Integer, nullable=False, server_default=text("0")),
    Column("updated_at", UTCDateTime(), nullable=False),
    #: The id of this enrollment's latest journal row: its journal is read back from
    #: here along ``enrollment_journal.prev_id`` (ADR 0018).
    Column("journal_tail", BigInteger, nullable=True),
    Index("ix_enrollments_journey_profile", "journey_id", "profile_id"),
    Index("ix_enrollments_profile_status", "workspace_id", "profile_id", "status"),
    # Timers: the due ones are an index range scan, whatever the number waiting.
    Index(
        "ix_enrollments_due",
        "wake_at",
        sqlite_where=text("status = 'active' AND wake_at IS NOT NULL"),
        postgresql_where=text("status = 'active' AND wake_at IS NOT NULL"),
    ),
)

enrollment_journal = Table(
    "enrollment_journal",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("workspace_id", String(40), nullable=False),
    Column("journey_id", String(40), nullable=False),
    Column("enrollment_id", String(40), nullable=False),
    Column("profile_id", String(40), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("node", String(64), nullable=True),
    Column("detail", JsonDoc, nullable=False),
    #: The enrollment's journal row before this one (``None`` for its first). The journal
    #: has no index by enrollment: each wake-up inserted into it at a random place, a
    #: quarter of a timer batch at a million waiting (ADR 0018).
    Column("prev_id", BigInteger, nullable=True),
    Index("ix_enrollment_journal_journey", "journey_id", "kind", "node"),
)

#: Date triggers: when each profile's date trait next falls due for a journey.
date_schedules = Table(
    "date_schedules",
    metadata,
    Column("journey_id", String(40), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("due_at", UTCDateTime(), nullable=False),
    Index("ix_date_schedules_due", "due_at"),
)
