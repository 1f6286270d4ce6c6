from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, text

from whenthen.storage.metadata import BigIntPK, JsonDoc, UTCDateTime, metadata

profiles = Table(
    "profiles",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("traits", JsonDoc, nullable=False),
    # When each top-level trait was last set (ISO 8601): latest timestamp wins on merge.
    Column("trait_times", JsonDoc, nullable=False),
    Column("email", String(320), nullable=True),
    Column("phone", String(32), nullable=True),
    Column("timezone", String(64), nullable=True),
    Column("first_seen", UTCDateTime(), nullable=True),
    Column("last_seen", UTCDateTime(), nullable=True),
    Column("event_count", BigInteger, nullable=False),
    # Set when this profile was merged into another; it then only redirects.
    Column("merged_into", String(40), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_profiles_workspace_email", "workspace_id", "email"),
    Index("ix_profiles_workspace_phone", "workspace_id", "phone"),
    Index("ix_profiles_workspace_last_seen", "workspace_id", "last_seen"),
    # The tombstones redirecting to a profile (a merge flattens chains; erasure finds
    # them): partial, so it holds the merged-away profiles only (0009).
    Index(
        "ix_profiles_merged_into",
        "merged_into",
        "workspace_id",
        sqlite_where=text("merged_into IS NOT NULL"),
        postgresql_where=text("merged_into IS NOT NULL"),
    ),
)

#: userIds and anonymousIds of a profile; one owner per (workspace, kind, value).
identities = Table(
    "identities",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("value", String(255), primary_key=True),
    Column("profile_id", String(40), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_identities_profile", "profile_id"),
)

profile_merges = Table(
    "profile_merges",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("workspace_id", String(40), nullable=False),
    Column("from_profile_id", String(40), nullable=False),
    Column("into_profile_id", String(40), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("message_id", String(255), nullable=True),
    Column("merged_at", UTCDateTime(), nullable=False),
    Index("ix_profile_merges_into", "workspace_id", "into_profile_id"),
    Index("ix_profile_merges_from", "workspace_id", "from_profile_id"),  # erasure (0009)
)

#: Keyed hashes of erased identities: re-imports of an erased person are suppressed.
erasures = Table(
    "erasures",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("identity_hash", String(64), primary_key=True),
    Column("erased_at", UTCDateTime(), nullable=False),
)

groups = Table(
    "groups",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("group_id", String(255), primary_key=True),
    Column("traits", JsonDoc, nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

group_members = Table(
    "group_members",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("group_id", String(255), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("joined_at", UTCDateTime(), nullable=False),
    Index("ix_group_members_profile", "profile_id"),
)

profile_tags = Table(
    "profile_tags",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("tag", String(100), primary_key=True),
    Column("added_at", UTCDateTime(), nullable=False),
    Index("ix_profile_tags_tag", "workspace_id", "tag"),
)

#: Consent per channel: the latest change wins. No row means no decision recorded.
consents = Table(
    "consents",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("channel", String(16), primary_key=True),
    # subscribed / unsubscribed
    Column("status", String(16), nullable=False),
    Column("source", String(200), nullable=False),
    Column("changed_at", UTCDateTime(), nullable=False),
)

#: People whose lists, tags, stage or traits changed outside the event pipeline (admin
#: API, CSV import, journey actions, tag rules): a worker step re-evaluates their segments.
#: One row per person; marking again moves ``queued_at`` forward.
profile_rechecks = Table(
    "profile_rechecks",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("reason", String(40), nullable=False),
    Column("queued_at", UTCDateTime(), nullable=False),
    Index("ix_profile_rechecks_queued", "queued_at"),
)
